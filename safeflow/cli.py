"""The ``safeflow`` command: assets, extract, train, eval, sweep, generate, demo, attack."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SafeflowError


def _features_file(path: str):
    from .io import load_tensors

    tensors, header = load_tensors(path)
    if "hidden" not in tensors or "labels" not in tensors:
        raise SafeflowError(f"{path} is not a features file; create one with `safeflow extract`")
    return tensors["hidden"], tensors["labels"], header


def cmd_assets(args: argparse.Namespace) -> int:
    from . import assets

    if args.action == "fetch":
        assets.fetch_all(progress=True)
        path = assets.default_model_path("smollm2-135m-instruct")
        print(f"assets ready in {assets.cache_root()} (default model: {path})")
        return 0
    rows = assets.status()
    bad = 0
    for r in rows:
        state = "fetched" if r["fetched"] else "not fetched"
        if args.action == "verify" and r["fetched"]:
            state = "OK" if not r["problems"] else "FAILED: " + "; ".join(r["problems"])
            bad += bool(r["problems"])
        print(f"{r['package'] + '==' + r['version']:<36} {r['license']:<11} {state}")
    if args.action == "verify" and not all(r["fetched"] for r in rows):
        print("some packages are not fetched; run `safeflow assets fetch`")
        bad += 1
    return 1 if bad else 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .extractors import HFExtractor
    from .io import save_tensors
    from .models import load_model
    from .responses import response_states

    model, tok = load_model(args.model)
    data = load_prompts(args.data)
    ext = HFExtractor(model, tok, layer=args.layer, pooling=args.pooling, batch_size=args.batch_size, cache_dir=args.cache)
    header = {"model": args.model, "layer": ext.layer, "pooling": args.pooling}
    if args.responses:
        harmful, benign = data.where(label=1), data.where(label=0)
        states = response_states(ext, harmful.texts, benign.texts if args.with_benign else (),
                                 max_tokens=args.responses, progress=True)
        sources = harmful.sources + benign.sources
        H, y = states.H, states.y
        header.update(responses=args.responses, sources=[sources[i] for i in states.prompt_index.tolist()], kinds=states.kind)
    else:
        H, y = ext.extract(data.texts), data.y
        header["sources"] = data.sources
    save_tensors(args.out, {"hidden": H, "labels": y}, header)
    print(f"wrote {tuple(H.shape)} hidden states (layer {ext.layer}) to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .constraints.base import ConstraintSet
    from .presets import preset

    H, y, _ = _features_file(args.features)
    if args.constraint == "polytope":
        p = preset(args.preset)
        model = ConstraintSet.create("polytope", input_dim=H.shape[1], num_facets=args.facets, num_features=args.features_width)
        model.fit(H, y, margin=args.margin if args.margin is not None else p.margin, feature_l1=p.feature_l1, epochs=args.epochs)
    else:
        model = ConstraintSet.create(args.constraint, input_dim=H.shape[1]).fit(H, y, epochs=args.epochs)
    model.save(args.out)
    print(f"wrote {args.constraint} constraint set to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .constraints.base import ConstraintSet
    from .evaluation import detection_metrics

    H, y, header = _features_file(args.features)
    model = ConstraintSet.load(args.constraints)
    rows = {"all": detection_metrics(y, model.score(H))}
    sources = header.get("sources") or []
    for s in sorted(set(sources)):
        idx = [i for i, x in enumerate(sources) if x == s]
        rows[s] = detection_metrics(y[idx], model.score(H[idx]))
    print(json.dumps(rows, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .constraints.base import ConstraintSet
    from .generation import generate_responses
    from .models import load_model
    from .presets import preset
    from .steerers.base import Steerer

    prompts = list(args.prompt) + (Path(args.file).read_text("utf-8").splitlines() if args.file else [])
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise SafeflowError("no prompt given; pass PROMPT or --file FILE (one prompt per line)")
    model, tok = load_model(args.model)
    layer = args.layer if args.layer is not None else preset(args.preset).layer
    constraints = ConstraintSet.load(args.constraints)
    gate = ConstraintSet.load(args.gate) if args.gate not in ("prompt", "token") else args.gate
    steerer = Steerer.create(args.steerer, **({"preset": args.preset} if args.preset else {}))
    steer = dict(constraints=constraints, steerer=steerer, layer=layer, gate=gate, first_n_tokens=args.first_n)
    plain, _, _ = generate_responses(model, tok, prompts, max_new_tokens=args.max_new_tokens)
    steered, _, log = generate_responses(model, tok, prompts, max_new_tokens=args.max_new_tokens, steer=steer)
    for p, a, b in zip(prompts, plain, steered):
        print(f"=== {p}\n--- unsteered:\n{a}\n--- steered ({'moved' if a != b else 'unchanged'}):\n{b}\n")
    if log:
        print(json.dumps({k: v for k, v in log.summary().items() if k != "steered_tokens_per_row"}))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .extractors import HFExtractor
    from .models import load_model
    from .pipeline import default_splits, format_table, layer_sweep

    model, tok = load_model(args.model)
    ext = HFExtractor(model, tok, batch_size=args.batch_size, cache_dir=args.cache)
    layers = args.layers or list(range(len(ext.blocks)))
    rows = layer_sweep(ext, default_splits(load_prompts("default")), layers, kind=args.constraint)
    print(format_table(rows, list(rows[0])))
    best = max(rows, key=lambda r: (r["val_ood_f1"], r["val_ood_auroc"]))
    print(f"best layer by OOD validation F1: {best['layer']}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import random

    from .attacks import cache_file
    from .attacks.protocol import (attack_requests, build_attacks, protocol_prompts, render_report,
                                   run_attack_protocol)
    from .constraints.base import ConstraintSet
    from .data import load_prompts
    from .extractors import HFExtractor
    from .io import write_text_atomic
    from .models import load_model
    from .pipeline import train_constraints
    from .presets import preset
    from .steerers.base import Steerer

    model, tok = load_model(args.model)
    layer = args.layer if args.layer is not None else preset(args.preset).layer
    train, test = protocol_prompts(load_prompts(args.data), args.data == "default", args.seed)
    requests = attack_requests(train, args.requests or None, args.seed)
    out = Path(args.out)
    detector = None
    if "adaptive-gcg" in args.attacks:
        if args.detector:
            detector = ConstraintSet.load(args.detector)
        else:
            H = HFExtractor(model, tok, layer=layer).extract(train.texts)
            detector = train_constraints("polytope", H, train.y, args.preset, args.features_width)
            detector.save(out / "adaptive_detector.safetensors")
    gcg = {"steps": args.gcg_steps, "candidates": args.gcg_candidates, "suffix_length": args.gcg_suffix_length,
           "topk": args.gcg_topk}
    attacks = build_attacks(args.attacks, model, tok, gcg=gcg, template={"max_chars": args.template_max_chars},
                            detector=detector, layer=layer,
                            adaptive={"weight": args.adaptive_weight, "margin": args.adaptive_margin}, seed=args.seed)
    if args.generate_only:
        for name, attack in attacks.items():
            path = cache_file(args.cache, attack)
            prompts = attack.generate(requests, cache=path)
            print(f"{name}: {len(prompts)} attack prompts in {path}")
        return 0
    benign = test.where(label=0).texts
    benign = random.Random(args.seed).sample(benign, min(args.benign, len(benign)))
    harmful = train.where(label=1).texts
    refusal_prompts = random.Random(args.seed).sample(harmful, min(args.refusal_prompts, len(harmful)))
    steerers = {name: Steerer.create(name, **({"preset": args.preset} if args.preset else {})) for name in args.steerers}
    result = run_attack_protocol(
        model, tok, attacks, requests, train=train, benign=benign, layer=layer, cache_dir=args.cache,
        gate=args.gate, steerers=steerers, refusal_prompts=refusal_prompts, preset=args.preset,
        num_features=args.features_width, refusal_features=args.refusal_features_width,
        max_new_tokens=args.max_new_tokens, seed=args.seed)
    report = result.report
    write_text_atomic(out / "attack_report.json", json.dumps({k: v for k, v in report.items() if k != "records"}, indent=2))
    write_text_atomic(out / "attack_records.jsonl", "\n".join(json.dumps(r) for r in report["records"]) + "\n")
    write_text_atomic(out / "attack_report.md", render_report(report))
    for name, det in result.detectors.items():
        det.save(out / f"detector_{name}.safetensors")
    if result.refusal is not None:
        result.refusal.save(out / "refusal_polytope.safetensors")
    print(render_report(report))
    print(f"report: {out / 'attack_report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import format_table, run_demo

    result = run_demo(args.out, model_name=args.model, limit=args.limit or None, max_new_tokens=args.max_new_tokens,
                      num_features=args.features_width, refusal_prompts=args.refusal_prompts,
                      refusal_features=args.refusal_features_width, cache_dir=args.cache)
    print(format_table(result["detection"], ["model", "split", "n", "f1", "fpr", "auroc"]))
    s = result["steering"]
    print(format_table([{k: s[k] for k in ("harmful_refusal_unsteered", "harmful_refusal_steered", "benign_unchanged",
                                            "edgy_false_refusal_unsteered", "edgy_false_refusal_steered")}],
                       ["harmful_refusal_unsteered", "harmful_refusal_steered", "benign_unchanged",
                        "edgy_false_refusal_unsteered", "edgy_false_refusal_steered"]))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeflow", description="Learned safety polytopes: detect and steer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="fetch, list or verify the pinned default model and prompt sets")
    p.add_argument("action", choices=["fetch", "list", "verify"])
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("extract", help="extract hidden states of a prompt set to a safetensors file")
    p.add_argument("--model", default="smollm2-135m-instruct", help="default model name, HF id or local path")
    p.add_argument("--data", default="default", help="'default' or a CSV/JSONL with text,label[,category]")
    p.add_argument("--layer", type=int, default=20, help="decoder block index (its output is read)")
    p.add_argument("--pooling", choices=["last", "mean"], default="last")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache", default=None, help="directory for a resumable hidden-state cache")
    p.add_argument("--responses", type=int, default=0, metavar="N",
                   help="instead of prompt states: response states of the harmful prompts over N response tokens "
                        "(own answer = unsafe, refusal = safe); train a refusal polytope on them")
    p.add_argument("--with-benign", action="store_true", help="with --responses: add benign prompts' answers as safe")
    p.add_argument("--out", default="runs/features.safetensors")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="train a constraint set on a features file")
    p.add_argument("--features", default="runs/features.safetensors")
    p.add_argument("--constraint", default="polytope", help="registered name: polytope, mlp, linear")
    p.add_argument("--facets", type=int, default=14)
    p.add_argument("--features-width", type=int, default=16384, help="polytope feature-map width F")
    p.add_argument("--margin", type=float, default=None, help="polytope margin κ (default: the preset's)")
    p.add_argument("--preset", default=None, help="model preset (see safeflow.presets)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="runs/polytope.safetensors")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="detection metrics of a constraint set on a features file, per source")
    p.add_argument("--features", default="runs/features.safetensors")
    p.add_argument("--constraints", default="runs/polytope.safetensors")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate with and without steering, side by side")
    p.add_argument("prompt", nargs="*", help="prompt(s)")
    p.add_argument("--file", help="file with one prompt per line")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--constraints", default="runs/polytope.safetensors")
    p.add_argument("--steerer", default="safeflow")
    p.add_argument("--gate", default="prompt",
                   help="'prompt', 'token', or a detector constraint set file (steer only the prompts it flags)")
    p.add_argument("--layer", type=int, default=None, help="default: the preset's layer")
    p.add_argument("--preset", default=None, help="model preset for the layer and the steerer's weights")
    p.add_argument("--first-n", type=int, default=20, help="steer only the first n generated tokens")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="choose the layer by out-of-distribution validation (default data)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", type=int, nargs="*", help="layers to try (default: all)")
    p.add_argument("--constraint", default="linear", help="constraint set fitted per layer (fast: linear)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache", default=None, help="directory for a resumable hidden-state cache")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="assets → extract → train → detect → steer → report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=50, help="prompts per group for the steering evaluation (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--features-width", type=int, default=16384, help="detection polytope width F")
    p.add_argument("--refusal-prompts", type=int, default=240, help="harmful train prompts for the refusal polytope")
    p.add_argument("--refusal-features-width", type=int, default=4096, help="refusal (steering) polytope width F")
    p.add_argument("--cache", default=None, help="directory for a resumable hidden-state cache")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("attack", help="jailbreak attacks: generate (cached), split 80/20, attack success with and without steering")
    p.add_argument("--attacks", nargs="+", default=["direct", "template", "gcg"],
                   help="registered attacks: direct, template, gcg, adaptive-gcg")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="default", help="'default' or a CSV/JSONL with text,label[,category]")
    p.add_argument("--layer", type=int, default=None, help="steering/detection layer (default: the preset's)")
    p.add_argument("--preset", default=None, help="model preset (layer, polytope and steerer settings)")
    p.add_argument("--requests", type=int, default=40, help="harmful train requests to attack (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gcg-steps", type=int, default=25)
    p.add_argument("--gcg-candidates", type=int, default=64, help="candidate suffixes evaluated per step")
    p.add_argument("--gcg-suffix-length", type=int, default=16, help="suffix tokens")
    p.add_argument("--gcg-topk", type=int, default=64, help="candidate tokens per suffix position")
    p.add_argument("--template-max-chars", type=int, default=4000, help="longest jailbreak template used")
    p.add_argument("--detector", default=None,
                   help="constraint set adaptive-gcg attacks (default: a polytope trained on the train split, saved to --out)")
    p.add_argument("--adaptive-weight", type=float, default=0.01, help="weight of the detector term in adaptive-gcg")
    p.add_argument("--adaptive-margin", type=float, default=0.0, help="depth inside the detector adaptive-gcg aims for")
    p.add_argument("--steerers", nargs="*", default=["safeflow"], help="steerers compared with unsteered generation")
    p.add_argument("--gate", default="polytope", help="detector gating steering (polytope, mlp, linear) or prompt/token")
    p.add_argument("--benign", type=int, default=60, help="benign test prompts (unchanged answers, false refusals)")
    p.add_argument("--refusal-prompts", type=int, default=240, help="harmful train prompts for the refusal polytope")
    p.add_argument("--features-width", type=int, default=16384, help="detection polytope width F")
    p.add_argument("--refusal-features-width", type=int, default=4096, help="refusal (steering) polytope width F")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--cache", default="runs/attack-cache", help="directory of the resumable attack-prompt caches")
    p.add_argument("--generate-only", action="store_true", help="only generate (and cache) the attack prompts")
    p.add_argument("--out", default="runs/attack")
    p.set_defaults(func=cmd_attack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (SafeflowError, FileNotFoundError) as exc:
        print(f"safeflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
