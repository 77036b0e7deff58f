"""Detection per harm family on each family's out-of-distribution sources, before and after the
training data was widened (issue 21, point 4).

Run from the repository root (CPU is enough; about 10 min for the states of ~3,800 prompts with
2 threads, then about 2 min per polytope fit)::

    PYTHONPATH=$PWD python benchmarks/family_detection.py --seeds 0 1 2 --out family_detection.json

Steps: the default model and its preset layer (``safeflow.presets.preset("auto", model)``); the
prompt states of every default prompt at that layer (cached in ``--states``, a safetensors file
keyed by the prompts' sha256, so a rerun skips extraction); for each seed the default splits
(:func:`safeflow.splits.default_splits` with ``widen=True``); a detection polytope with the preset's options and a
linear probe, fitted on the training split *without* the widening sources ("before") and *with*
them ("after"); then, per family and split (``val`` = ``val_ood``, ``test`` = ``test_ood``):

* ``recall``: the family's unsafe rows in its OOD sources (:data:`~safeflow.splits.FAMILY_OOD_SOURCES`)
  flagged unsafe (threshold 0, the detector's own);
* ``f1`` and ``auroc``: those rows against the split's OOD benign rows (val: ``rho-refusal-50`` and
  ``weighted-safety`` benign; test: ``rho-refusal-100`` benign and ``rho-overrefusal``);
* ``fpr`` (one figure per split): the share of benign rows flagged — the split's OOD benign rows
  plus, for ``test``, the held-out benign rows of the training sources (``test_id``).

Seeds change the 70/30 in-distribution split, the polytope's initialisation and batch order; the
OOD sources are the same for every seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

import safeflow as sf
from safeflow.constraints.base import ConstraintSet
from safeflow.data import PromptSet, prompt_families
from safeflow.evaluation import detection_metrics
from safeflow.layers import find_decoder_layers
from safeflow.splits import (FAMILY_OOD_SOURCES, OOD_TEST_SOURCES, OOD_VALIDATION_SOURCES, WIDENING_SOURCES,
                             default_splits)
from safeflow.presets import preset, resolve_layer

log = logging.getLogger("family_detection")


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_states(data: PromptSet, path: Path, batch_size: int = 16) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """States of every prompt at the preset layer, read from ``path`` where present."""
    from safetensors.torch import load_file, save_file

    model, tok = sf.load_model()
    p = preset("auto", model)
    layer = resolve_layer(p, len(find_decoder_layers(model)))
    cached = load_file(str(path)) if path.is_file() else {}
    todo = sorted({t for t in data.texts if _key(t) not in cached})
    if todo:
        # the output of block ``layer`` does not depend on later blocks: drop them (a third of the time)
        model.model.layers = model.model.layers[: layer + 1]
        model.config.num_hidden_layers = layer + 1
        ext = sf.Extractor.create("hf", model=model, tokenizer=tok, layer=layer, batch_size=batch_size)
        H = ext.extract(todo)
        cached.update({_key(t): H[i].contiguous() for i, t in enumerate(todo)})
        save_file(cached, str(path), metadata={"layer": str(layer)})
    return cached, {"layer": layer, "fit_options": sf.PolytopeConstraints.fit_options_from_preset(p),
                    **sf.PolytopeConstraints.config_from_preset(p)}


def fit(kind: str, H: torch.Tensor, y: torch.Tensor, info: dict[str, Any], seed: int) -> ConstraintSet:
    torch.manual_seed(seed)
    if kind == "polytope":
        poly = ConstraintSet.create("polytope", input_dim=H.shape[1], num_facets=info["num_facets"],
                                    num_features=info["num_features"])
        return poly.fit(H, y, **info["fit_options"], progress=False)
    return ConstraintSet.create(kind, input_dim=H.shape[1]).fit(H, y, progress=False)


def family_rows(model: ConstraintSet, states: dict[str, torch.Tensor], split: PromptSet, benign: PromptSet,
                fpr_pool: PromptSet, part: str) -> list[dict[str, Any]]:
    def score(ps: PromptSet) -> torch.Tensor:
        return model.score(torch.stack([states[_key(t)] for t in ps.texts]))

    neg = score(benign)
    fpr = float((score(fpr_pool) > 0).float().mean())
    fams = prompt_families(split)
    rows = []
    # the sources the earlier figures used (rho-refusal-50; rho-refusal-100 + rho-overrefusal), whole
    rho = split.where(sources=OOD_VALIDATION_SOURCES if part == "val" else OOD_TEST_SOURCES)
    m = detection_metrics(rho.y, score(rho))
    rows.append({"family": "rho (all rows)", "split": part, "n": sum(rho.labels), "recall": m["recall"],
                 "f1": m["f1"], "auroc": m["auroc"], "fpr": m["fpr"], "n_benign": len(rho) - sum(rho.labels),
                 "n_fpr_pool": len(rho) - sum(rho.labels)})
    for family, where in FAMILY_OOD_SOURCES.items():
        idx = [i for i, (s, f) in enumerate(zip(split.sources, fams)) if f == family and s in where[part]]
        if not idx:
            continue
        pos = score(split.subset(idx))
        m = detection_metrics(torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]), torch.cat([pos, neg]))
        rows.append({"family": family, "split": part, "n": len(idx), "recall": m["recall"], "f1": m["f1"],
                     "auroc": m["auroc"], "fpr": fpr, "n_benign": len(benign), "n_fpr_pool": len(fpr_pool)})
    return rows


def run(seeds: list[int], states_path: Path, out: Path | None = None) -> dict[str, Any]:
    """All rows; with ``out``, the result so far is written there after every fit."""
    data = sf.load_prompts("default")
    states, info = prompt_states(data, states_path)
    results: list[dict[str, Any]] = []
    # the cheap probe first, so that a slow machine still has its figures for every seed
    for kind, seed, stage in ((k, s, st) for k in ("linear", "polytope") for s in seeds for st in ("before", "after")):
        splits = default_splits(data, seed, widen=True)
        train = splits.train if stage == "after" else splits.train.where(
            sources=set(splits.train.sources) - set(WIDENING_SOURCES))
        model = fit(kind, torch.stack([states[_key(t)] for t in train.texts]), train.y, info, seed)
        for part, split in (("val", splits.val_ood), ("test", splits.test_ood)):
            benign = split.where(label=0)
            pool = benign + splits.test_id.where(label=0) if part == "test" else benign
            for row in family_rows(model, states, split, benign, pool, part):
                results.append({"seed": seed, "stage": stage, "model": kind, "train_rows": len(train), **row})
        if out is not None:
            out.write_text(json.dumps({"layer": info["layer"], "seeds": seeds, "rows": results,
                                       "summary": summary(results)}, indent=1))
        log.info("%s, seed %d, %s: done", kind, seed, stage)
    return {"layer": info["layer"], "seeds": seeds, "rows": results}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (stage, model, split, family)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["model"], r["split"], r["family"]), []).append(r)
    out = []
    for (stage, model, part, family), rs in sorted(groups.items()):
        row: dict[str, Any] = {"stage": stage, "model": model, "split": part, "family": family, "n": rs[0]["n"],
                               "seeds": len(rs)}
        for k in ("f1", "recall", "auroc", "fpr"):
            vals = [r[k] for r in rs]
            row[k] = round(statistics.fmean(vals), 3)
            row[k + "_sd"] = round(statistics.pstdev(vals), 3)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--states", type=Path, default=Path("family_states.safetensors"))
    ap.add_argument("--out", type=Path, default=Path("family_detection.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args.seeds, args.states, args.out)
    result["summary"] = summary(result["rows"])
    args.out.write_text(json.dumps(result, indent=1))
    cols = ["stage", "model", "split", "family", "n", "f1", "recall", "auroc", "fpr"]
    print(" | ".join(cols))
    for r in result["summary"]:
        print(" | ".join(f"{r[c]:.3f}±{r[c + '_sd']:.3f}" if c in ("f1", "recall", "auroc", "fpr") else str(r[c])
                         for c in cols))


if __name__ == "__main__":
    main()
