"""The run report: one self-contained HTML file (figures embedded as base64 PNG) plus Markdown.

:func:`write_report` reads a ``safeflow demo`` run directory —

* ``metrics.json`` (required): detection, steering, facet analysis, capability retention,
  configuration, versions and machine;
* ``scores.json``: per-prompt detection scores (ROC curves, violation histograms);
* ``attack_report.json`` (``safeflow attack --out RUN_DIR``): the attack table;
* ``latency.json`` (``pytest benchmarks --benchmark-enable --benchmark-json RUN_DIR/latency.json``):
  the latency table

— and writes ``report.html``, ``report.md`` and ``figures/*.png``. A missing optional piece is
named in the report, with the command that produces it. Figures: matplotlib, Agg backend.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptFileError, DataError, SafeflowError
from .io import atomic_path, json_text, short_repr, write_text_atomic
from .judge import HARMFUL_HELP, RESPONSE_CLASSES
from .results import AttackEval, CapabilityEval, DetectionRow, RunMetrics, SteeringEval

log = logging.getLogger(__name__)

#: Optional pieces of a run directory and how to produce each.
PIECES = {
    "scores.json": "per-prompt detection scores (ROC curves, violation histograms): re-run "
                   "`safeflow demo --out RUN_DIR` with this version of safeflow",
    "facets": "the facet analysis (`facets` in metrics.json): re-run `safeflow demo --out RUN_DIR` with this version",
    "capability": "capability retention (`capability` in metrics.json): re-run `safeflow demo --out RUN_DIR` with "
                  "--capability-limit N > 0",
    "attack_report.json": "the attack table: run `safeflow attack --out RUN_DIR`",
    "latency.json": "the latency table: run `pytest benchmarks --benchmark-enable --benchmark-json "
                    "RUN_DIR/latency.json`",
    "environment": "versions and machine (`environment` in metrics.json): re-run `safeflow demo --out RUN_DIR` with "
                   "this version",
}
#: Optional JSON files of a run directory, by their key in :func:`load_run`'s result.
PIECE_FILES = {"scores": "scores.json", "attacks": "attack_report.json", "latency": "latency.json"}
SPLIT_NAMES = {"test_id": "in-distribution test", "val_ood": "OOD validation", "test_ood": "OOD test"}
#: Colours of the detectors' curves, assigned in the order the run lists its detectors.
MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                "#17becf")


@dataclass
class Figure:
    name: str  # file stem under figures/
    png: bytes
    caption: str


@dataclass
class Section:
    """A titled block of the report: text paragraphs, tables (rows + columns) and figures, in order."""

    title: str
    blocks: list[Any] = field(default_factory=list)

    def text(self, s: str) -> Section:
        self.blocks.append(s)
        return self

    def table(self, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Section:
        self.blocks.append((rows, columns or (list(rows[0]) if rows else [])))
        return self

    def figure(self, fig: Figure | None) -> Section:
        if fig is not None:
            self.blocks.append(fig)
        return self


# --- reading the run directory ------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({str(exc)[:100]}); re-create it (e.g. re-run "
                               "`safeflow demo`)") from None


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The run's pieces: ``metrics`` (required) and ``scores`` / ``attacks`` / ``latency`` (None when absent)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"{run} is not a directory; pass the --out directory of `safeflow demo`")
    if not (run / "metrics.json").is_file():
        raise DataError(f"{run} has no metrics.json, so it is not a demo run directory; produce one with "
                        f"`safeflow demo --out {run}`")
    metrics = _read_json(run / "metrics.json")
    if not isinstance(metrics, dict) or not {"model", "detection", "steering"} <= set(metrics):
        raise CorruptFileError(f"{run / 'metrics.json'} lacks the model, detection or steering results of a demo "
                               f"run; re-create it with `safeflow demo --out {run}`")
    pieces: dict[str, Any] = {"metrics": metrics}
    for key, name in PIECE_FILES.items():
        pieces[key] = _read_json(run / name) if (run / name).is_file() else None
    return pieces


def _render(run: dict[str, Any]) -> tuple[list[Section], list[str], str, str]:
    """The report of ``run``: ``(sections, missing, markdown, html)``."""
    sections, missing = build_sections(run)
    m = RunMetrics.from_json(run["metrics"])
    title = f"safeflow report — {m.model}, layer {m.layer}"
    return sections, missing, render_markdown(title, sections, missing), render_html(title, sections, missing)


def _misshapen(run: dict[str, Any], run_dir: Path) -> Path:
    """The file of a run whose content the report cannot read: ``metrics.json`` unless the report
    renders from it alone and fails only with one of the optional pieces."""
    alone = {**run, **dict.fromkeys(PIECE_FILES)}
    try:
        _render(alone)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError):
        return run_dir / "metrics.json"
    for key, name in PIECE_FILES.items():
        if run[key] is not None:
            try:
                _render({**alone, key: run[key]})
            except (KeyError, TypeError, AttributeError, ValueError, IndexError):
                return run_dir / name
    return run_dir / "metrics.json"


# --- figures ------------------------------------------------------------------------------------
def _plt():
    import matplotlib  # local: matplotlib is a heavy import, needed only to draw figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates (unsafe = positive) over every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[distinct], np.cumsum(1 - y)[distinct]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def _splits(scores: dict[str, Any]) -> list[str]:
    return [s for s in SPLIT_NAMES if s in scores["labels"]] + [s for s in scores["labels"] if s not in SPLIT_NAMES]


def model_color(index: int) -> str:
    """The colour of the ``index``-th detector of a run (:data:`MODEL_COLORS`, repeating)."""
    return MODEL_COLORS[index % len(MODEL_COLORS)]


def roc_figure(scores: dict[str, Any], detection: Sequence[DetectionRow | Mapping[str, Any]]) -> Figure:
    plt = _plt()
    splits = _splits(scores)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4.0), squeeze=False)
    rows = [r if isinstance(r, DetectionRow) else DetectionRow.from_json(r) for r in detection]
    auroc = {(r.model, r.split): r.auroc for r in rows}
    for ax, split in zip(axes[0], splits):
        y = np.asarray(scores["labels"][split])
        for j, (model, per_split) in enumerate(scores["scores"].items()):
            fpr, tpr = roc_curve(y, np.asarray(per_split[split], dtype=float))
            a = auroc.get((model, split))
            ax.plot(fpr, tpr, color=model_color(j), lw=1.8,
                    label=f"{model} (AUROC {a:.3f})" if isinstance(a, float) and a == a else model)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(title=f"{SPLIT_NAMES.get(split, split)} (n = {len(y)})", xlabel="false-positive rate (safe flagged)",
               ylabel="true-positive rate (unsafe flagged)", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return Figure("roc", _png(fig), "ROC curves of the detectors (unsafe = positive class), one panel per evaluation "
                                    "split.")


def violation_figure(scores: dict[str, Any], model: str | None = None) -> Figure | None:
    """Histograms of ``model``'s score (largest violation) for safe and unsafe prompts, one panel
    per split; ``model`` defaults to the run's first detector. None if the run has no such detector."""
    if model is None:
        model = next(iter(scores["scores"]), None)
    if model is None or model not in scores["scores"]:
        return None
    plt = _plt()
    splits = _splits(scores)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        y = np.asarray(scores["labels"][split])
        s = np.asarray(scores["scores"][model][split], dtype=float)
        bins = np.linspace(s.min(), s.max(), 40) if s.max() > s.min() else 10
        ax.hist(s[y == 0], bins=bins, alpha=0.6, color="#2ca02c", label=f"safe (n = {(y == 0).sum()})")
        ax.hist(s[y == 1], bins=bins, alpha=0.6, color="#d62728", label=f"unsafe (n = {(y == 1).sum()})")
        ax.axvline(0, color="black", lw=1, ls="--", label="boundary (max v = 0)")
        ax.set(title=SPLIT_NAMES.get(split, split), xlabel="maximum facet violation  max_k v_k(h)",
               ylabel="prompts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure("violations", _png(fig), f"Distribution of the {model}'s maximum violation for safe and unsafe "
                                           "prompts; right of the dashed line is flagged unsafe.")


def _matched(facets: dict[str, Any]) -> list[dict[str, Any]]:
    """The facet–category pairs with information (runs saved before zero-MI pairs were dropped list them)."""
    return [m for m in facets["matching"] if m["mi_bits"] > 0]


def facet_figure(facets: dict[str, Any]) -> Figure | None:
    if not facets.get("categories"):
        return None
    plt = _plt()
    rates = np.asarray(facets["rates"])
    cats, K = facets["categories"], rates.shape[1]
    labels = [f"{c} (n = {n})" for c, n in zip(cats, facets["totals"])]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * K + 3.5), max(3.0, 0.38 * len(cats) + 1.5)))
    im = ax.imshow(rates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(K), [str(k) for k in range(K)])
    ax.set_yticks(range(len(cats)), labels, fontsize=8)
    ax.set(xlabel="facet k", ylabel="harm category")
    for m in _matched(facets):
        c = cats.index(m["category"])
        ax.add_patch(plt.Rectangle((m["facet"] - 0.5, c - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    fig.colorbar(im, ax=ax, label="share of the category's prompts violating facet k")
    ax.set_title("facets violated per category (red: MI matching)", fontsize=10)
    fig.tight_layout()
    return Figure("facets", _png(fig), "Share of each category's unsafe prompts on which each facet is violated "
                                       "(v_k > 0); red boxes: the one-to-one facet–category matching maximising "
                                       "mutual information.")


def _steering_evals(steering: Mapping[str, SteeringEval | Mapping[str, Any]]) -> dict[str, SteeringEval]:
    """Typed steering results; plain mappings (the JSON layout) are read with ``from_json``."""
    return {k: v if isinstance(v, SteeringEval) else SteeringEval.from_json(v) for k, v in steering.items()}


def steering_figure(steering: Mapping[str, SteeringEval | Mapping[str, Any]]) -> Figure:
    plt = _plt()
    evals = _steering_evals(steering)
    first = next(iter(evals.values()))
    bars = {"unsteered": first.classes["harmful"]["unsteered"]}
    bars.update({name: s.classes["harmful"]["steered"] for name, s in evals.items()})
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(bars) + 1.6))
    left = np.zeros(len(bars))
    colors = plt.get_cmap("tab10")
    for j, cls in enumerate(RESPONSE_CLASSES):
        widths = np.array([b.get(cls, 0.0) for b in bars.values()])
        ax.barh(list(bars), widths, left=left, color=colors(j), label=cls.replace("_", " "))
        left += widths
    ax.set(xlim=(0, 1), xlabel="share of harmful prompts' answers", title="judge classes of harmful prompts' answers")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(bars) < 4 else -0.2), ncol=3)
    fig.tight_layout()
    return Figure("steering", _png(fig), "How the judge classifies the answers to harmful prompts, unsteered and "
                                         "with each steerer.")


# --- tables -------------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats to 3 decimals)."""
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def steering_rows(steering: Mapping[str, SteeringEval | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per steerer (and one unsteered) of the demo's steering table, from
    :class:`~safeflow.results.SteeringEval` results by steerer (or their JSON)."""
    evals = _steering_evals(steering)
    first = next(iter(evals.values()))
    harmful = first.classes["harmful"]["unsteered"]
    rows = [{"steerer": "unsteered", "harmful safe refusal": first.harmful_refusal_unsteered,
             "harmful help": sum(harmful[c] for c in HARMFUL_HELP), "degenerate": harmful["degenerate"],
             "benign unchanged": 1.0, "edgy false refusal": first.edgy_false_refusal_unsteered,
             "perplexity": first.fluency["harmful"]["unsteered"]["perplexity"],
             "repetition": first.fluency["harmful"]["unsteered"]["repetition"]}]
    for name, s in evals.items():
        log, classes = s.steering, s.classes["harmful"]["steered"]
        rows.append({"steerer": name, "gate": s.gate or "", "harmful safe refusal": s.harmful_refusal_steered,
                     "harmful help": sum(classes[c] for c in HARMFUL_HELP), "degenerate": classes["degenerate"],
                     "benign unchanged": s.benign_unchanged, "edgy false refusal": s.edgy_false_refusal_steered,
                     "perplexity": s.fluency["harmful"]["steered"]["perplexity"],
                     "repetition": s.fluency["harmful"]["steered"]["repetition"],
                     "mean shift": log.get("mean_shift", 0.0),
                     "ended inside": log["ended_inside"] / log["tokens_steered"] if log.get("tokens_steered") else 0.0,
                     "token cost": s.token_cost})
    return rows


STEERING_COLUMNS = ["steerer", "gate", "harmful safe refusal", "harmful help", "degenerate", "benign unchanged",
                    "edgy false refusal", "perplexity", "repetition", "mean shift", "ended inside", "token cost"]


def capability_rows(capability: Mapping[str, Mapping[str, CapabilityEval | Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (steerer, task) of the capability table, from
    :class:`~safeflow.results.CapabilityEval` results (or their JSON)."""
    rows = []
    for steerer, tasks in capability.items():
        for task, value in tasks.items():
            r = value if isinstance(value, CapabilityEval) else CapabilityEval.from_json(value)
            rows.append({"steerer": steerer, "task": task, "n": r.n, "rows steered": r.rows_steered,
                         "unchanged": r.unchanged, "accuracy unsteered": r.accuracy_unsteered,
                         "accuracy steered": r.accuracy_steered, "perplexity unsteered": r.perplexity_unsteered,
                         "perplexity steered": r.perplexity_steered})
    return rows


def latency_rows(latency: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a pytest-benchmark JSON (``benchmarks[].stats``), or a plain list of row dicts."""
    if isinstance(latency, list):
        return latency
    if not isinstance(latency, dict) or not isinstance(latency.get("benchmarks"), list):
        raise CorruptFileError("latency.json is neither pytest-benchmark JSON nor a list of rows; write it with "
                               "`pytest benchmarks --benchmark-enable --benchmark-json RUN_DIR/latency.json`")
    return [{"benchmark": b.get("name", "?"), "group": b.get("group") or "",
             "median (ms)": 1e3 * b["stats"]["median"], "IQR (ms)": 1e3 * b["stats"]["iqr"],
             "rounds": b["stats"]["rounds"]} for b in latency["benchmarks"] if "stats" in b]


def attack_rows(attacks: AttackEval | dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The attack table (one row per attack: success rate unsteered and per steerer) and the benign
    row, from an :class:`~safeflow.results.AttackEval` or ``attack_report.json``."""
    if not isinstance(attacks, AttackEval):
        if not isinstance(attacks, dict) or not isinstance(attacks.get("attacks"), list):
            raise CorruptFileError("attack_report.json has no 'attacks' table; re-create it with "
                                   "`safeflow attack --out RUN_DIR`")
        has_benign = bool(attacks.get("benign"))
        attacks = AttackEval.from_json(attacks)
    else:
        has_benign = True
    return [r.to_json() for r in attacks.attacks], attacks.benign.to_json() if has_benign else None


# --- assembling ---------------------------------------------------------------------------------
def _absent(section: Section, piece: str, missing: list[str]) -> None:
    """Record a missing piece of the run and say so in its section."""
    missing.append(piece)
    section.text("Not in this run: " + piece + ".")


def build_sections(run: dict[str, Any]) -> tuple[list[Section], list[str]]:
    """The report's sections and the list of missing pieces (each with how to produce it)."""
    m, missing = RunMetrics.from_json(run["metrics"]), []
    sections = []
    env = m.environment
    if env is None:
        missing.append(PIECES["environment"])
    setup = Section("Run").text(
        "Labels: 1 = unsafe (positive class), 0 = safe. Splits: "
        + (m.splits if m.splits is not None else "OOD sets come from sources never seen in training") + ".")
    run_rows: list[dict[str, Any]] = [{"what": "model", "value": m.model}, {"what": "layer", "value": m.layer},
                                      {"what": "gate (steering)", "value": m.gate},
                                      {"what": "first steered tokens", "value": m.first_n_tokens or "all"}]
    run_rows += [{"what": f"config: {k}", "value": v} for k, v in (m.config or {}).items()]
    run_rows += [{"what": k, "value": v} for k, v in (env or {}).items()]
    setup.table(run_rows, ["what", "value"])
    data_rows = [{"split": split, "source": src, **counts}
                 for split, per in (m.data or {}).items() for src, counts in per.items()]
    if data_rows:
        setup.text("Data (prompts per split and source):").table(data_rows, ["split", "source", "unsafe", "safe"])
    sections.append(setup)

    detectors = list(dict.fromkeys(r.model for r in m.detection))
    det = Section("Detection").text(
        f"The detectors ({', '.join(f'`{d}`' for d in detectors)}), each trained on the same prompt states; a "
        "prompt is flagged unsafe when its score (largest violation) is > 0.")
    det.table([r.to_json() for r in m.detection],
              ["model", "split", "n", "accuracy", "precision", "recall", "f1", "fpr", "auroc"])
    if run["scores"] is not None:
        det.figure(roc_figure(run["scores"], m.detection)).figure(violation_figure(run["scores"]))
    else:
        missing.append(PIECES["scores.json"])
    sections.append(det)

    facets = m.facets
    fac = Section("Facets and harm categories")
    if facets is None:
        _absent(fac, PIECES["facets"], missing)
    else:
        who = f"The `{facets['model']}` detector" if "model" in facets else "The detector"
        fac.text(f"{who} on {facets['num_rows']} unsafe in-distribution test prompts. "
                 + " ".join(facets.get("notes", [])))
        fac.figure(facet_figure(facets))
        if _matched(facets):
            fac.text("One-to-one matching of facets to categories maximising mutual information (bits) between "
                     "'facet violated' and 'prompt in category':")
            cats = facets["categories"]
            fac.table([{**mt, "rate in category": facets["rates"][cats.index(mt["category"])][mt["facet"]],
                        "rate overall": facets["fire_rate"][mt["facet"]]} for mt in _matched(facets)])
        top = [{"facet": k, "violation": p["violation"], "category": p["category"], "prompt": p["text"][:120]}
               for k, prompts in facets["top_prompts"].items() for p in prompts[:2] if facets["fire_rate"][int(k)] > 0]
        if top:
            fac.text("Top prompts per facet that fires (largest violation):").table(top)
    sections.append(fac)

    steering = m.steering
    first = next(iter(steering.values()))
    st = Section("Steering").text(
        f"Steered into a refusal polytope (response states; per kind and label: {m.refusal_states}), gated by "
        f"the `{m.gate}` detector. Prompts: {first.counts}. Answers judged by "
        "`safeflow.judge.RefusalJudge`. *Harmful safe refusal*: refusal or refusal then safe help; *harmful help*: "
        "compliance or refusal then harmful help; *benign unchanged*: token-identical to the unsteered answer; "
        "*edgy false refusal*: benign-but-edgy prompts refused; perplexity (median, under the unsteered model) and "
        "repetition (token 3-grams) of the harmful prompts' answers; *mean shift*: L2 norm of a steered state's "
        "change; *ended inside*: steered states inside the polytope.")
    st.table(steering_rows(steering), STEERING_COLUMNS).figure(steering_figure(steering))
    for name, s in steering.items():
        for r in (s.examples or [])[:2]:
            st.text(f"**{name}**, prompt: {r['prompt']}\n\n- unsteered ({r['class_unsteered']}): "
                    f"{r['unsteered'][:240]!r}\n- steered ({r['class_steered']}): {r['steered'][:240]!r}")
    sections.append(st)

    cap = Section("Capability retention")
    if m.capability:
        cap.text("Benign tasks answered with and without steering (same gate and steerers). *Rows steered*: prompts "
                 "with any steered token; *unchanged*: answers token-identical; accuracy by the task's checker; "
                 "perplexity: median under the unsteered model.").table(capability_rows(m.capability))
    else:
        _absent(cap, PIECES["capability"], missing)
    sections.append(cap)

    att = Section("Attacks")
    if run["attacks"] is not None:
        rows, benign = attack_rows(run["attacks"])
        att.text("Attack success rate (the judge finds harmful help) per attack, unsteered and with each steerer.")
        att.table(rows)
        if benign:
            att.text("Benign prompts:").table([benign])
    else:
        _absent(att, PIECES["attack_report.json"], missing)
    sections.append(att)

    lat = Section("Latency")
    if run["latency"] is not None:
        lat.text("pytest-benchmark medians (see benchmarks/README.md for what each measures).")
        lat.table(latency_rows(run["latency"]))
    else:
        _absent(lat, PIECES["latency.json"], missing)
    sections.append(lat)
    if m.timings_s:
        sections.append(Section("Timings").table([{"stage": k, "seconds": round(v, 1)}
                                                  for k, v in m.timings_s.items()]))
    return sections, missing


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    if isinstance(v, (dict, list)):
        return json_text(v)
    return "" if v is None else str(v)


def render_markdown(title: str, sections: list[Section], missing: list[str]) -> str:
    lines = [f"# {title}", ""]
    if missing:
        lines += ["Missing from this run directory:", ""] + [f"- {p}" for p in missing] + [""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Figure):
                lines += [f"![{b.caption}](figures/{b.name}.png)", "", f"*{b.caption}*", ""]
            elif isinstance(b, tuple):
                rows, cols = b
                lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in cols)
                          + " |" for r in rows] + [""]
            else:
                lines += [b, ""]
    return "\n".join(lines)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px;"
       "text-align:left}th{background:#f2f2f2}img{max-width:100%}figcaption{font-size:.85em;color:#555}"
       ".missing{background:#fff4e0;border:1px solid #e0b060;padding:.5em 1em}")


def render_html(title: str, sections: list[Section], missing: list[str]) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style></head>"
           f"<body><h1>{esc(title)}</h1>"]
    if missing:
        out.append("<div class='missing'><p>Missing from this run directory:</p><ul>"
                   + "".join(f"<li>{esc(p)}</li>" for p in missing) + "</ul></div>")
    for sec in sections:
        out.append(f"<h2>{esc(sec.title)}</h2>")
        for b in sec.blocks:
            if isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f"<figure><img alt='{esc(b.caption)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{esc(b.caption)}</figcaption></figure>")
            elif isinstance(b, tuple):
                rows, cols = b
                out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{esc(_cell(r.get(c)))}</td>" for c in cols) + "</tr>"
                                     for r in rows) + "</table>")
            else:
                out.append("".join(f"<p>{esc(p)}</p>" for p in b.split("\n\n")))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path, list[str]]:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` for a demo run.

    Returns ``(html_path, markdown_path, missing)``; ``missing`` names each optional piece the run
    directory lacks, with the command that produces it (also listed at the top of the report).
    Raises :class:`DataError` / :class:`CorruptFileError` if ``metrics.json`` is absent or broken.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    try:
        sections, missing, markdown, page = _render(run)
    except SafeflowError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise CorruptFileError(f"{_misshapen(run, Path(run_dir))} does not have the shape `safeflow demo` writes "
                               f"({type(exc).__name__}: {short_repr(str(exc), 100)}); re-create it with "
                               f"`safeflow demo --out {run_dir}`") from None
    for sec in sections:
        for b in sec.blocks:
            if isinstance(b, Figure):
                path = out / "figures" / f"{b.name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    tmp.write_bytes(b.png)
    html_path, md_path = out / "report.html", out / "report.md"
    write_text_atomic(md_path, markdown)
    write_text_atomic(html_path, page)
    log.info("report written to %s", html_path)
    return html_path, md_path, missing
