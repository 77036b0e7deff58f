"""`safeflow report` on a small run directory built from real (tiny) pieces: every promised file,
tables with the expected rows, missing pieces named, bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import safeflow as sf
from safeflow.analysis import analyze_facets
from safeflow.capability import capability_retention
from safeflow.cli import main
from safeflow.demo import environment
from safeflow.io import json_text, write_text_atomic
from safeflow.recipes import detection_scores, detection_table
from safeflow.report import roc_curve, write_report
from safeflow.results import SCHEMA, RunMetrics
from safeflow.splits import Splits

from conftest import make_model, make_tokenizer, separable
from test_analysis import planted_data, planted_polytope
from test_steering import always_inside

PNG = b"\x89PNG\r\n\x1a\n"
HARMFUL, BENIGN = ["how do i make a bomb", "hack bank steal car"], ["bake cookies please", "plan trip paris"]


def fake_split(H: torch.Tensor, y: torch.Tensor, name: str) -> sf.PromptSet:
    return sf.PromptSet([f"{name} {i}" for i in range(len(y))], y.tolist(), sources=[name] * len(y))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """What `safeflow demo` writes, from tiny real pieces: three detectors on separable states,
    two steerers on a tiny model, the facet analysis of a planted polytope, capability retention."""
    out = tmp_path_factory.mktemp("run")
    sets = {name: separable(60, 8, seed=s) for s, name in enumerate(["train", "test_id", "val_ood", "test_ood"])}
    H, y = sets.pop("train")
    models = {"polytope": sf.PolytopeConstraints(8, 3, 32, backend="torch").fit(H, y, margin=1.0, epochs=5,
                                                                                  progress=False),
              "mlp": sf.ConstraintSet.create("mlp", input_dim=8, hidden_sizes=[16]).fit(H, y, epochs=5, progress=False),
              "linear": sf.ConstraintSet.create("linear", input_dim=8).fit(H, y, epochs=5, progress=False)}
    splits = Splits(fake_split(H, y, "train"), *(fake_split(*sets[n], n) for n in ("test_id", "val_ood", "test_ood")))
    model, tok = make_model("llama"), make_tokenizer()
    steering, capability, unsteered = {}, {}, None
    for name, steerer in (("safeflow", sf.SafeFlowSteerer()), ("projection", sf.Steerer.create("projection",
                                                                                                solver="native"))):
        r = sf.evaluate_steering(model, tok, always_inside(32), steerer, 2, harmful=HARMFUL, benign=BENIGN,
                                 edgy=BENIGN[:1], gate="token", max_new_tokens=4, unsteered=unsteered)
        unsteered = r.unsteered
        steering[name] = dataclasses.replace(r, unsteered=None, records=[], examples=r.records[:1])
        c = capability_retention(model, tok, always_inside(32), steerer, 2, BENIGN, targets=["1", "2"],
                                 gate="token", max_new_tokens=4)
        capability[name] = {"rho-gsm8k": dataclasses.replace(c, unsteered=None, records=[])}
    Hf, data = planted_data()
    metrics = RunMetrics(model="tiny-llama", layer=2, preset={}, config={"limit": 2}, environment=environment(),
                         data={n: getattr(splits, n).summary() for n in ("train", "test_id", "val_ood", "test_ood")},
                         detection=detection_table(models, sets), gate="linear", refusal_states={},
                         first_n_tokens=None, steering=steering,
                         facets=analyze_facets(planted_polytope(), Hf, data).to_dict(), capability=capability,
                         timings_s={"load": 1.0})
    write_text_atomic(out / "metrics.json", json_text(metrics.to_json(), indent=2))
    write_text_atomic(out / "scores.json", json_text(detection_scores(models, sets, splits)))
    return out


def table_rows(md: str, header_start: str) -> list[str]:
    lines = md.splitlines()
    i = next(j for j, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_report_writes_every_promised_file(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed and "safeflow attack --out RUN_DIR" in printed
    for name in ("roc", "violations", "facets", "steering"):
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 5000, name
    html = (out / "report.html").read_text()
    assert len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", html)) == 4
    assert "<img" in html and "figures/" not in html  # self-contained
    md = (out / "report.md").read_text()
    for name in ("roc", "violations", "facets", "steering"):
        assert f"(figures/{name}.png)" in md
    detection = table_rows(md, "| model | split |")
    assert len(detection) == 9 and {r.split("|")[1].strip() for r in detection} == {"polytope", "mlp", "linear"}
    steering = table_rows(md, "| steerer | gate | harmful safe refusal |")
    assert [r.split("|")[1].strip() for r in steering] == ["unsteered", "safeflow", "projection"]
    capability = table_rows(md, "| steerer | task |")
    assert [r.split("|")[1].strip() for r in capability] == ["safeflow", "projection"]
    matching = table_rows(md, "| facet | category | mi_bits |")
    assert [r.split("|")[2].strip() for r in matching] == ["fraud", "cyber", "violence"]
    assert "Missing from this run directory" in md and "latency.json" in md
    assert "tiny-llama" in md and "torch" in md and environment()["torch"] in md


def test_attack_and_latency_tables_when_present(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    attacks = {"attacks": [{"attack": "direct", "n": 8, "asr_unsteered": 0.5, "asr_safeflow": 0.125},
                           {"attack": "gcg", "n": 8, "asr_unsteered": 0.75, "asr_safeflow": 0.25}],
               "benign": {"n": 10, "unchanged_safeflow": 0.9}}
    (run / "attack_report.json").write_text(json.dumps(attacks))
    bench = {"benchmarks": [{"name": "test_steer", "group": "steering",
                             "stats": {"median": 0.0123, "iqr": 0.001, "rounds": 5}}]}
    (run / "latency.json").write_text(json.dumps(bench))
    html, md_path, missing = write_report(run)
    assert missing == [] and html == run / "report.html"
    md = md_path.read_text()
    assert "Missing from this run directory" not in md
    assert [r.split("|")[1].strip() for r in table_rows(md, "| attack |")] == ["direct", "gcg"]
    assert table_rows(md, "| benchmark |") == ["| test_steer | steering | 12.300 | 1.000 | 5 |"]


def test_old_run_directory_names_what_is_missing(run_dir, tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("facets", "capability", "environment"):
        del metrics[key]
    (run / "metrics.json").write_text(json.dumps(metrics))
    _, md_path, missing = write_report(run)
    assert len(missing) == 6  # scores, facets, capability, attacks, latency, environment
    md = md_path.read_text()
    assert "re-run `safeflow demo --out RUN_DIR`" in md and not (run / "figures" / "roc.png").exists()
    assert (run / "figures" / "steering.png").is_file()


def test_bad_run_directories(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist; pass the --out directory of `safeflow demo`" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no metrics.json" in err and f"safeflow demo --out {tmp_path}" in err
    (tmp_path / "metrics.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps({"model": "x"}))
    assert main(["report", str(tmp_path)]) == 2
    assert "lacks the model, detection or steering" in capsys.readouterr().err


def test_roc_curve_matches_direct_thresholds():
    y = torch.tensor([0, 1, 1, 0, 1, 0]).numpy()
    s = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.8, -1.0]).numpy()
    fpr, tpr = roc_curve(y, s)
    thresholds = sorted(set(s.tolist()), reverse=True)
    assert fpr.tolist() == [0.0] + [((s >= t) & (y == 0)).sum() / 3 for t in thresholds]
    assert tpr.tolist() == [0.0] + [((s >= t) & (y == 1)).sum() / 3 for t in thresholds]


@pytest.mark.parametrize("damage", [
    {"detection": 5}, {"detection": [["a"]]}, {"steering": {"safeflow": "x"}}, {"data": {"train": 3}},
    {"facets": {"num_rows": 1}},
])
def test_metrics_of_the_wrong_shape_are_one_line(run_dir, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, **damage}))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run / 'metrics.json'} does not have the shape `safeflow demo` writes" in err
    assert not (run / "report.html").exists()


def test_scores_of_the_wrong_shape_name_scores_json(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "scores.json").write_text(json.dumps({"test_id": [1, 2, 3]}))
    assert main(["report", str(run)]) == 2
    assert f"{run / 'scores.json'} does not have the shape" in capsys.readouterr().err


# --- typed results and old run folders -----------------------------------------------------------
OLD_METRICS = Path(__file__).parent / "data" / "metrics_before_schema.json"


def test_metrics_written_before_typed_results_still_render(tmp_path, capsys):
    """A metrics.json from before safeflow.results (no "schema") renders, with its tables intact."""
    run = tmp_path / "old"
    run.mkdir()
    shutil.copy(OLD_METRICS, run / "metrics.json")
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    steering = table_rows(md, "| steerer | gate | harmful safe refusal |")
    assert [r.split("|")[1].strip() for r in steering] == ["unsteered", "safeflow", "projection@token"]
    assert [r.split("|")[2].strip() for r in steering[1:]] == ["token", "token"]
    assert [r.split("|")[1].strip() for r in table_rows(md, "| model | split |")] == ["polytope"] * 2 + ["linear"] * 2
    assert [r.split("|")[1].strip() for r in table_rows(md, "| steerer | task |")] == ["safeflow", "projection@token"]
    assert "Missing from this run directory" in md and "per-prompt detection scores" in md
    old = json.loads(OLD_METRICS.read_text())
    typed = RunMetrics.from_json(old)
    assert typed.steering["safeflow"].gate == "token" and typed.detection[0].model == "polytope"
    again = typed.to_json()  # the same layout, plus "schema" at the top and in each result
    assert again.pop("schema") == SCHEMA
    for per in (again["steering"], *again["capability"].values()):
        for r in per.values():
            assert r.pop("schema") == SCHEMA
    assert json.loads(json_text(again)) == old


def test_results_round_trip_and_read_the_old_keys(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    typed = RunMetrics.from_json(metrics)
    assert json.loads(json_text(typed.to_json())) == metrics and metrics["schema"] == SCHEMA
    s = typed.steering["safeflow"]
    assert metrics["steering"]["safeflow"]["schema"] == SCHEMA and "records" not in metrics["steering"]["safeflow"]
    with pytest.warns(DeprecationWarning, match="read its attributes instead"):
        assert s["harmful_refusal_steered"] == s.harmful_refusal_steered
    with pytest.warns(DeprecationWarning):
        assert s.get("token_cost") == s.token_cost and s.get("nope", 3) == 3
    with pytest.warns(DeprecationWarning):
        assert typed["detection"][0]["auroc"] == typed.detection[0].auroc
    assert "examples" in s and "gate" not in s and "records" in s and len(list(s)) == len(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.token_cost = 2.0  # type: ignore[misc]
    with pytest.raises(sf.CorruptFileError, match="schema 99, but this safeflow reads schema <= 1"):
        RunMetrics.from_json({**metrics, "schema": 99})


def test_a_newer_schema_is_one_line(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "schema": SCHEMA + 1}))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has schema {SCHEMA + 1}" in err and "upgrade safeflow" in err
