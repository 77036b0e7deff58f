"""The ``safeflow`` command: assets, extract, train, eval, sweep, generate, demo, attack, report.

Every user error — a bad argument, an unreadable or hostile file, a model that cannot be loaded,
a full disk — is reported as one line ``safeflow: error: ...`` naming the fix, with exit status 2
and no traceback. Two central pieces give a new subcommand this for free: the parser class
(:class:`~safeflow.cli_args.Parser`, inherited by every subparser) turns argument errors into that
line, and :func:`main` does the same for the exceptions in :data:`USER_ERRORS`. Arguments are
checked before any model is loaded by the ``type=`` validators of :mod:`safeflow.cli_args`
(:func:`~safeflow.cli_args.positive_int`, :func:`~safeflow.cli_args.input_file`, ...), re-exported
here.

This module is argument parsing and command glue only: each ``cmd_*`` function turns parsed
arguments into calls of the library (:mod:`safeflow.feature_files`, :mod:`safeflow.evaluation`,
:mod:`safeflow.recipes`, :mod:`safeflow.demo`, ...) and prints what they return.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .cli_args import (Parser, data_source, features_path, fraction, gate_source, input_file, key_value,
                       model_name, nonnegative_float, nonnegative_int, output_dir, output_file, positive_int,
                       preset_name, registered, run_directory, steerer_entry, steerer_options, steerer_source,
                       text_file)
from .errors import ConfigError, DataError, SafeflowError

#: Exceptions that are the user's to fix: reported as one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (SafeflowError, OSError, UnicodeDecodeError, FloatingPointError,
                                                 MemoryError)


#: ``errno`` values of a full disk or quota: the commands that write say what was kept.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe(exc: BaseException) -> str:
    """One line for a user error, naming the fix."""
    if isinstance(exc, OSError) and exc.filename is not None:
        fixes = {errno.ENOSPC: "free disk space or write elsewhere", errno.EACCES: "choose a writable location",
                 errno.EPERM: "choose a writable location", errno.EROFS: "choose a writable location",
                 errno.EISDIR: "pass a file path, not a directory", errno.ENOTDIR: "a part of the path is a file",
                 errno.ENOENT: "check the path"}
        return f"{exc.filename}: {exc.strerror or exc}; {fixes.get(exc.errno or 0, 'check the path')}"
    if isinstance(exc, MemoryError):
        return "out of memory; use smaller settings (e.g. --features-width, --batch-size)"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    return str(exc) or type(exc).__name__


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


def _load_model(args: argparse.Namespace, world):
    """``args.model`` loaded on every rank of ``world`` (:func:`~safeflow.distributed.load_model_per_node`)."""
    import torch

    from .distributed import load_model_per_node

    return load_model_per_node(world, args.model, dtype=getattr(torch, args.dtype), device_map=args.device_map,
                               cpu=args.cpu, trust_remote_code=args.trust_remote_code)


def _spawn(args: argparse.Namespace) -> int:
    """``--processes N``: run this command in N processes on this machine."""
    from .distributed import launch_with_cache

    return launch_with_cache(run, args.processes, argparse.Namespace(**{**vars(args), "processes": 1}), cpu=args.cpu,
                             cache_dir=args.cache)


def cmd_extract(args: argparse.Namespace) -> int:
    """``safeflow extract``; a full disk says what was kept and where a retry resumes."""
    try:
        return _extract(args)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        kept = (f"the hidden states finished so far are kept in the cache {args.cache}: free space and rerun the "
                "same command, it resumes from them" if args.cache else
                "no hidden states were kept: free space and rerun, with --cache DIR so that a retry resumes from "
                "the finished batches")
        raise SafeflowError(f"{describe(exc)}; {args.out} was not written (a previous file there is unchanged); "
                            f"{kept}") from None


def _extract(args: argparse.Namespace) -> int:
    from .data import load_prompts, split_indices
    from .distributed import join
    from .extractors import HFExtractor
    from .feature_files import row_columns, write_features
    from .models import check_layers
    from .provenance import describe_source
    from .responses import prompt_set_response_states

    if args.processes > 1:
        return _spawn(args)
    data = load_prompts(args.data)
    part = ["train"] * len(data)
    if args.test_fraction:
        for i in split_indices(data, args.test_fraction, args.seed)[1]:
            part[i] = "test"
    check_layers(args.model, [args.layer], args.trust_remote_code)
    world = join(args.cpu, args.cache)
    model, tok = _load_model(args, world)
    ext = HFExtractor(model, tok, layer=args.layer, pooling=args.pooling, batch_size=args.batch_size, cache_dir=args.cache)
    header: dict[str, Any] = describe_source(ext, args.model)
    if args.responses:
        states, rows = prompt_set_response_states(ext, data, max_tokens=args.responses, with_benign=args.with_benign,
                                                  progress=world.is_main)
        H, y = states.H, states.y
        header.update(responses=args.responses, rows="responses", kinds=states.kind)
    elif world.size > 1:
        ext.fill_cache(data.texts)  # every rank computes its share; rank 0 reads and writes the file
        if not world.is_main:
            return 0
        H, y, rows = ext.cached(data.texts), data.y, list(range(len(data)))
    else:
        H, y, rows = ext.extract(data.texts), data.y, list(range(len(data)))
    header.update(row_columns(data, rows, part if args.test_fraction else None))
    if args.test_fraction:
        header.update(test_fraction=args.test_fraction, split_seed=args.seed)
    if world.is_main:
        write_features(args.out, H, y, header)
        held = f", {header['split'].count('test')} held out for testing" if args.test_fraction else ""
        print(f"wrote {tuple(H.shape)} hidden states (layer {ext.layer}{held}) to {args.out}"
              + (f" ({world.size} processes)" if world.size > 1 else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import time

    from .evaluation import training_metrics, training_summary
    from .feature_files import training_rows
    from .presets import match_preset
    from .recipes import fit_from_preset
    from .saving import save_rescue_copy

    rows = training_rows(args.features, args.chunk_rows)
    preset_name = args.preset or match_preset(str(rows.source.get("model", ""))) or "default"
    config = {key: value for key, value in (("num_facets", args.facets), ("num_features", args.features_width))
              if value is not None}
    options = {key: value for key, value in (("margin", args.margin), ("epochs", args.epochs)) if value is not None}
    started = time.perf_counter()
    model = fit_from_preset(args.constraint, rows.H, rows.y, preset_name, config=config,
                            fit_options={**options, **dict(args.fit_opt)})
    seconds = time.perf_counter() - started
    training = model.provenance["training"]
    training.update(features=str(args.features), preset=preset_name if type(model).reads_preset() else None,
                    split="train" if rows.test is not None else "all")
    training["metrics"] = training_metrics(model, (rows.H, rows.y) if rows.y is not None else None, rows.test)
    model.provenance.update(rows.source)
    try:
        model.save(args.out)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        try:
            kept = (f"the trained {args.constraint} set was saved to {save_rescue_copy(model, args.out)} instead: move "
                    "it into place once space is free")
        except OSError as lost:
            kept = (f"the trained {args.constraint} set is lost (no copy could be saved in a temporary directory "
                    f"either: {lost.strerror or lost}): free space and rerun `safeflow train`")
        raise SafeflowError(f"{describe(exc)}; {args.out} was not written (a previous file there is unchanged); "
                            f"{kept}") from None
    print(training_summary(args.constraint, model, rows.source, seconds, len(rows)))
    print(f"wrote {args.constraint} constraint set to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .constraints.base import ConstraintSet
    from .evaluation import grouped_detection_metrics
    from .feature_files import read_features, row_groups, row_split, split_rows
    from .io import json_text
    from .provenance import check_source, source_of

    H, y, header = read_features(args.features)
    model = ConstraintSet.load(args.constraints)
    if not args.ignore_provenance:
        source = source_of(header)
        check_source(model.provenance, model=source.get("fingerprint"), layer=source.get("layer"),
                     what=f"the constraint set {args.constraints}")
    split = row_split(header, len(y), args.features)
    part = args.split or ("test" if split else "all")
    if part != "all" and split is None:
        raise DataError(f"{args.features} has no train/test split; extract with --test-fraction F, or pass --split all")
    rows = split_rows(split, part)
    idx = rows if rows is not None else list(range(len(y)))
    if not idx:
        raise DataError(f"{args.features} has no {part} rows; pass --split all")
    groups = {column: [values[i] for i in idx] for column, values in row_groups(header, len(y)).items()}
    out = {"split": part, **grouped_detection_metrics(y[idx], model.score(H[idx]), groups)}
    print(json_text(out, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .constraints.base import ConstraintSet
    from .decoding import generate_responses
    from .steering import SteeringSpec
    from .io import json_text
    from .layers import default_model_layer
    from .models import check_layers, load_model, model_config
    from .presets import match_preset
    from .provenance import check_source, recorded_layer
    from .recipes import load_or_build_steerer, steerer_name

    prompts = list(args.prompt) + (Path(args.file).read_text("utf-8").splitlines() if args.file else [])
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise SafeflowError("no prompt given; pass PROMPT or --file FILE (one prompt per line)")
    constraints = ConstraintSet.load(args.constraints)
    gate = ConstraintSet.load(args.gate) if args.gate not in ("prompt", "token") else args.gate
    preset_name = args.preset or match_preset(str(args.model)) or "default"
    name = steerer_name(args.steerer, preset_name)  # None: a saved steerer file
    options = steerer_options(args.steerer_opt, [name], name) if name is not None else dict(args.steerer_opt)
    steerer = load_or_build_steerer(args.steerer, preset_name, options)
    sets = [(constraints, f"the constraint set {args.constraints}")]
    sets += [(gate, f"the gate {args.gate}")] if isinstance(gate, ConstraintSet) else []
    layer = args.layer if args.layer is not None else recorded_layer(constraints, gate)
    check_layers(args.model, [layer], args.trust_remote_code)
    config = model_config(args.model, args.trust_remote_code)
    if config is not None and not args.ignore_provenance:  # refuse a mismatch before the model loads
        for c, what in sets:
            check_source(c.provenance, model=config, what=what)
    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    layer = layer if layer is not None else default_model_layer(model, args.preset)
    steer = SteeringSpec(constraints=constraints, steerer=steerer, layer=layer, gate=gate, first_n_tokens=args.first_n,
                         check_provenance=not args.ignore_provenance)
    steer.check(model)  # fail before the unsteered pass, not after it
    template = constraints.provenance.get("chat_template", "auto")  # format prompts as in training
    kw = dict(max_new_tokens=args.max_new_tokens, chat_template=template if isinstance(template, bool) else "auto")
    plain, _, _ = generate_responses(model, tok, prompts, **kw)
    steered, _, log = generate_responses(model, tok, prompts, steer=steer, **kw)
    for p, a, b in zip(prompts, plain, steered):
        print(f"=== {p}\n--- unsteered:\n{a}\n--- steered ({'moved' if a != b else 'unchanged'}):\n{b}\n")
    if log:
        print(json_text({k: v for k, v in log.summary().items() if k != "steered_tokens_per_row"}))
        print(f"steered at layer {layer}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .distributed import join
    from .extractors import HFExtractor
    from .models import check_layers
    from .recipes import layer_sweep
    from .report import format_table
    from .splits import prompt_splits

    if args.processes > 1:
        return _spawn(args)
    splits = prompt_splits(args.data)
    check_layers(args.model, list(args.layers or []), args.trust_remote_code)
    world = join(args.cpu, args.cache)
    model, tok = _load_model(args, world)
    ext = HFExtractor(model, tok, batch_size=args.batch_size, cache_dir=args.cache, progress=world.is_main)
    layers = args.layers or list(range(len(ext.blocks)))
    rows = layer_sweep(ext, splits, layers, kind=args.constraint, progress=world.is_main)
    if world.is_main:
        print(f"splits: {splits.describe()}")
        print(format_table(rows, list(rows[0])))
        best = max(rows, key=lambda r: (r["val_ood_f1"], r["val_ood_auroc"]))
        kind = "OOD" if splits.ood else "in-distribution"
        print(f"best layer by {kind} validation F1: {best['layer']} (use it with --layer {best['layer']})")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import random

    from .attacks import cache_file
    from .attacks.protocol import (attack_requests, build_attacks, protocol_prompts, render_report,
                                   run_attack_protocol, save_protocol)
    from .constraints.base import ConstraintSet
    from .data import load_prompts
    from .extractors import HFExtractor
    from .layers import default_model_layer
    from .models import check_layers, load_model
    from .recipes import DEMO_STEERERS, parse_steerer, train_constraints
    from .steerers.base import Steerer

    check_layers(args.model, [args.layer], args.trust_remote_code)
    entries = DEMO_STEERERS if args.steerers is None else args.steerers
    names = list(dict.fromkeys(parse_steerer(entry)[0] for entry in entries))
    options = {name: steerer_options(args.steerer_opt, names, name) for name in names}
    for name in names:  # an unknown option fails now, not after the model has loaded
        Steerer.implementation(name).check_options(options[name])
    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    layer = args.layer if args.layer is not None else default_model_layer(model, args.preset)
    train, test = protocol_prompts(load_prompts(args.data), args.data == "default", args.seed)
    requests = attack_requests(train, args.requests or None, args.seed)
    out = Path(args.out)
    detector = None
    if "adaptive-gcg" in args.attacks:
        if args.detector:
            detector = ConstraintSet.load(args.detector)
        else:
            H = HFExtractor(model, tok, layer=layer).extract(train.texts)
            detector = train_constraints(args.detector_constraint, H, train.y, args.preset, args.features_width)
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
    result = run_attack_protocol(
        model, tok, attacks, requests, train=train, benign=benign, layer=layer, cache_dir=args.cache,
        gate=args.gate, steerers=entries, steerer_options=options, refusal_prompts=refusal_prompts, preset=args.preset,
        num_features=args.features_width, refusal_features=args.refusal_features_width,
        max_new_tokens=args.max_new_tokens, seed=args.seed)
    save_protocol(result, out)
    print(render_report(result.report))
    print(f"report: {out / 'attack_report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .demo import run_demo
    from .models import check_layers
    from .recipes import DEMO_DETECTORS, DEMO_STEERERS, parse_steerer
    from .report import STEERING_COLUMNS, format_table, steering_rows
    from .splits import prompt_splits

    names = list(dict.fromkeys(parse_steerer(entry)[0] for entry in args.steerers or DEMO_STEERERS))

    data = None if args.data == "default" else load_prompts(args.data)
    if data is not None:
        prompt_splits(data)  # a split without a class fails now, not after the model has loaded
    check_layers(args.model, [args.layer], args.trust_remote_code)
    result = run_demo(args.out, model_name=args.model, layer=args.layer, limit=args.limit or None, data=data,
                      max_new_tokens=args.max_new_tokens, num_features=args.features_width,
                      refusal_prompts=args.refusal_prompts, refusal_features=args.refusal_features_width,
                      refusal_rounds=args.refusal_rounds, steerers=args.steerers or DEMO_STEERERS, first_n_tokens=args.first_n,
                      capability_limit=args.capability_limit or 0, trust_remote_code=args.trust_remote_code,
                      overwrite=args.overwrite,
                      capability_max_new_tokens=args.capability_max_new_tokens, cache_dir=args.cache,
                      steerer_options={name: steerer_options(args.steerer_opt, names, name) for name in names},
                      detectors=args.detectors or DEMO_DETECTORS)
    print(format_table([r.to_json() for r in result.detection], ["model", "split", "n", "f1", "fpr", "auroc"]))
    print(format_table(steering_rows(result.steering), STEERING_COLUMNS))
    print(f"report: {Path(args.out) / 'report.html'} (and report.md)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    html, md, missing = write_report(args.run_dir, args.out)
    for piece in missing:
        print(f"not in the run directory: {piece}")
    print(f"report: {html} (and {md.name})")
    return 0


def _steerer_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steerer-opt", type=key_value, action="append", default=[], metavar="[STEERER.]KEY=VALUE",
                   help="a constructor option of the steerer(s) (e.g. depth=2, max_steps=50; VALUE read as JSON "
                        "where it is JSON); STEERER. limits it to one steerer; repeatable")


def _trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own code (auto_map in its config); only for code you trust")


def _scale_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=positive_int, default=1, metavar="N",
                   help="run in N processes on this machine (needs --cache); on several machines use "
                        "`accelerate launch -m safeflow ...` instead")
    p.add_argument("--device-map", default=None,
                   help="split a model too large for one GPU, e.g. 'auto' (each process gets its share of the GPUs)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model weights dtype")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where there are GPUs")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="safeflow", description="Learned safety polytopes: detect and steer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="fetch, list or verify the pinned default model and prompt sets")
    p.add_argument("action", choices=["fetch", "list", "verify"])
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("extract", help="extract hidden states of a prompt set to a safetensors file")
    p.add_argument("--model", type=model_name, default="smollm2-135m-instruct",
                   help="default model name, HF id or local path")
    _trust_option(p)
    p.add_argument("--data", type=data_source, default="default",
                   help="'default' or a CSV/JSONL with text,label[,category]")
    p.add_argument("--layer", type=int, default=None,
                   help="decoder block index (its output is read; default: the model's preset layer, else the "
                        "paper's 20/32 of its depth)")
    p.add_argument("--pooling", choices=["last", "mean"], default="last")
    p.add_argument("--test-fraction", type=fraction, default=None, metavar="F",
                   help="hold out a fraction F of the prompts (stratified by source and label) for testing: "
                        "`train` fits on the rest, `eval` reports on them")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the --test-fraction split")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--cache", type=output_dir, default=None, help="directory for a resumable hidden-state cache")
    p.add_argument("--responses", type=nonnegative_int, default=0, metavar="N",
                   help="instead of prompt states: response states of the harmful prompts over N response tokens "
                        "(own answer = unsafe, refusal = safe); train a refusal polytope on them")
    p.add_argument("--with-benign", action="store_true", help="with --responses: add benign prompts' answers as safe")
    p.add_argument("--out", type=output_file, default="runs/features.safetensors")
    _scale_options(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="train a constraint set on a features file")
    p.add_argument("--features", type=features_path, default="runs/features.safetensors")
    p.add_argument("--constraint", type=registered("constraint"), default="polytope",
                   help="a registered constraint family (safeflow.available()['constraint'])")
    p.add_argument("--facets", type=positive_int, default=None,
                   help="number of facets K, for a family that has facets (default: the preset's)")
    p.add_argument("--features-width", type=positive_int, default=None,
                   help="feature-map width F, for a family that has one (default: the preset's)")
    p.add_argument("--margin", type=nonnegative_float, default=None,
                   help="training margin κ, for a family trained with one (default: the preset's)")
    p.add_argument("--preset", type=preset_name, default=None,
                   help="model preset (see safeflow.presets; default: the features' model's entry, else 'default')")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--fit-opt", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any training option of the constraint family (its fit's keywords, e.g. lr=0.005, "
                        "schedule=cosine; VALUE read as JSON where it is JSON); repeatable, overrides the preset "
                        "and the flags above")
    p.add_argument("--chunk-rows", type=positive_int, default=None, metavar="N",
                   help="stream the features from disk in chunks of N rows instead of loading them "
                        "(--features may then also be a directory of feature files)")
    p.add_argument("--out", type=output_file, default="runs/polytope.safetensors")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="detection metrics of a constraint set on a features file, per source and "
                                    "category")
    p.add_argument("--features", type=input_file, default="runs/features.safetensors")
    p.add_argument("--constraints", type=input_file, default="runs/polytope.safetensors")
    p.add_argument("--split", choices=["test", "train", "all"], default=None,
                   help="rows to evaluate (default: the held-out test rows if the file has a split, else all)")
    p.add_argument("--ignore-provenance", action="store_true",
                   help="evaluate even if the features come from another model or layer than the constraint set's")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate with and without steering, side by side")
    p.add_argument("prompt", nargs="*", help="prompt(s)")
    p.add_argument("--file", type=text_file, help="file with one prompt per line")
    p.add_argument("--model", type=model_name, default="smollm2-135m-instruct")
    _trust_option(p)
    p.add_argument("--constraints", type=input_file, default="runs/polytope.safetensors")
    p.add_argument("--steerer", type=steerer_source, default=None,
                   help="a registered steerer ('line': along the polytope's own refusal direction; 'safeflow': "
                        "gradient steps; 'projection': nearest point) or a saved fitted steerer file (a peer "
                        "written by `safeflow demo`); default: the preset's steerer (line for the default model)")
    _steerer_opt(p)
    p.add_argument("--gate", type=gate_source, default="prompt",
                   help="'prompt', 'token', or a detector constraint set file (steer only the prompts it flags)")
    p.add_argument("--layer", type=int, default=None,
                   help="default: the layer the constraint set was trained on (recorded in it), else the preset's")
    p.add_argument("--preset", type=preset_name, default=None,
                   help="model preset for the steerer's weights (and the layer, if the file records none)")
    p.add_argument("--ignore-provenance", action="store_true",
                   help="steer even if the constraint set was trained on another model or layer")
    p.add_argument("--first-n", type=nonnegative_int, default=20, help="steer only the first n generated tokens")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sweep", help="choose the layer by validation (out-of-distribution on the default data)")
    p.add_argument("--model", type=model_name, default="smollm2-135m-instruct")
    _trust_option(p)
    p.add_argument("--data", type=data_source, default="default",
                   help="'default' or your CSV/JSONL (text,label[,category][,source]): split in distribution")
    p.add_argument("--layers", type=int, nargs="*", help="layers to try (default: all)")
    p.add_argument("--constraint", type=registered("constraint"), default="linear",
                   help="constraint set fitted per layer (fast: linear)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--cache", type=output_dir, default=None, help="directory for a resumable hidden-state cache")
    _scale_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="assets → extract → train → detect → steer → report")
    p.add_argument("--out", type=output_dir, default="runs/demo")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a previous run: delete its files first (otherwise the run is refused)")
    p.add_argument("--model", type=model_name, default="smollm2-135m-instruct")
    _trust_option(p)
    p.add_argument("--data", type=data_source, default="default",
                   help="'default' or your CSV/JSONL (text,label[,category][,source]): split in distribution "
                        "(60/20/20 train/validation/test), the report says so")
    p.add_argument("--limit", type=nonnegative_int, default=50,
                   help="prompts per group for the steering evaluation (0: all)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--features-width", type=positive_int, default=None,
                   help="detection polytope width F (default: the preset's)")
    p.add_argument("--refusal-prompts", type=positive_int, default=240,
                   help="harmful train prompts for the refusal polytope")
    p.add_argument("--refusal-features-width", type=positive_int, default=4096,
                   help="refusal (steering) polytope width F")
    p.add_argument("--refusal-rounds", type=positive_int, default=1,
                   help="rounds of the refusal polytope: each further round adds the states of its own steered answers")
    p.add_argument("--layer", type=int, default=None, help="decoder block to detect and steer at (default: the preset's)")
    p.add_argument("--detectors", nargs="+", type=registered("constraint"), default=None,
                   help="constraint families trained as prompt detectors and compared (default: "
                        "safeflow.recipes.DEMO_DETECTORS); the best on OOD validation gates steering")
    p.add_argument("--steerers", nargs="+", type=steerer_entry, default=None,
                   help="steerers compared side by side: registry names, each optionally @detector, @prompt or "
                        "@token for its gate (default: safeflow's steerers and the peers, "
                        "safeflow.recipes.DEMO_STEERERS)")
    _steerer_opt(p)
    p.add_argument("--first-n", type=nonnegative_int, default=None,
                   help="steer only the first n generated tokens (default: all)")
    p.add_argument("--capability-limit", type=nonnegative_int, default=30,
                   help="prompts per capability task (GSM8K, factual true/false) answered with and without steering "
                        "(0: skip)")
    p.add_argument("--capability-max-new-tokens", type=positive_int, default=64)
    p.add_argument("--cache", type=output_dir, default=None, help="directory for a resumable hidden-state cache")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("attack", help="jailbreak attacks: generate (cached), split 80/20, attack success with and without steering")
    p.add_argument("--attacks", type=registered("attack"), nargs="+", default=["direct", "template", "gcg"],
                   help="registered attacks: direct, template, gcg, adaptive-gcg")
    p.add_argument("--model", type=model_name, default="smollm2-135m-instruct")
    _trust_option(p)
    p.add_argument("--data", type=data_source, default="default",
                   help="'default' or a CSV/JSONL with text,label[,category]")
    p.add_argument("--layer", type=int, default=None,
                   help="steering/detection layer (default: the preset's, else 20/32 of the model's depth)")
    p.add_argument("--preset", type=preset_name, default=None, help="model preset (layer, polytope and steerer settings)")
    p.add_argument("--requests", type=nonnegative_int, default=40, help="harmful train requests to attack (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gcg-steps", type=positive_int, default=25)
    p.add_argument("--gcg-candidates", type=positive_int, default=64, help="candidate suffixes evaluated per step")
    p.add_argument("--gcg-suffix-length", type=positive_int, default=16, help="suffix tokens")
    p.add_argument("--gcg-topk", type=positive_int, default=64, help="candidate tokens per suffix position")
    p.add_argument("--template-max-chars", type=positive_int, default=4000, help="longest jailbreak template used")
    p.add_argument("--detector", type=input_file, default=None,
                   help="constraint set adaptive-gcg attacks (default: a --detector-constraint set trained on the train "
                        "split, saved to --out)")
    p.add_argument("--detector-constraint", type=registered("constraint"), default="polytope",
                   help="the constraint family trained as adaptive-gcg's detector when --detector is not given")
    p.add_argument("--adaptive-weight", type=nonnegative_float, default=0.01,
                   help="weight of the detector term in adaptive-gcg")
    p.add_argument("--adaptive-margin", type=nonnegative_float, default=0.0,
                   help="depth inside the detector adaptive-gcg aims for")
    p.add_argument("--steerers", nargs="*", type=steerer_entry, default=None,
                   help="steerers compared with unsteered generation: registry names, each optionally @detector, "
                        "@prompt or @token for its gate (@detector: the detector --gate names; default: safeflow's "
                        "steerers and the peers, as in demo; none: unsteered only)")
    _steerer_opt(p)
    p.add_argument("--gate", default="polytope", help="detector gating steering (polytope, mlp, linear) or prompt/token")
    p.add_argument("--benign", type=positive_int, default=60, help="benign test prompts (unchanged answers, false refusals)")
    p.add_argument("--refusal-prompts", type=positive_int, default=240,
                   help="harmful train prompts for the refusal polytope")
    p.add_argument("--features-width", type=positive_int, default=16384, help="detection polytope width F")
    p.add_argument("--refusal-features-width", type=positive_int, default=4096, help="refusal (steering) polytope width F")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--cache", type=output_dir, default="runs/attack-cache",
                   help="directory of the resumable attack-prompt caches")
    p.add_argument("--generate-only", action="store_true", help="only generate (and cache) the attack prompts")
    p.add_argument("--out", type=output_dir, default="runs/attack")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("report", help="write report.html (figures embedded) and report.md for a demo run directory")
    p.add_argument("run_dir", type=run_directory, metavar="RUN_DIR", help="the --out directory of `safeflow demo`")
    p.add_argument("--out", type=output_dir, default=None, help="where to write the report (default: RUN_DIR)")
    p.set_defaults(func=cmd_report)
    return parser


#: Environment variable naming modules (comma-separated) that the command imports before parsing
#: its arguments: where third-party constraint families, steerers and attacks register themselves.
PLUGINS_VARIABLE = "SAFEFLOW_PLUGINS"


def load_plugins() -> list[str]:
    """Import the modules named in ``$SAFEFLOW_PLUGINS`` (each registers its implementations by
    subclassing); return their names. A module that cannot be imported raises :class:`ConfigError`."""
    import importlib

    names = [m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"cannot import {name!r} named in ${PLUGINS_VARIABLE} ({exc}); put the module on "
                              "PYTHONPATH or install it, or fix the variable") from None
    return names


def main(argv: list[str] | None = None) -> int:
    return run(argv)


def run(argv: list[str] | argparse.Namespace | None) -> int:
    """Parse ``argv`` (or take already parsed arguments, as each process of ``--processes`` does)
    and run the command; user errors print one line and return exit status 2."""
    try:
        load_plugins()
        args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
        return args.func(args)
    except KeyboardInterrupt:
        print("safeflow: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        rank = os.environ.get("RANK")  # several processes: say which one
        print(f"safeflow: error{f' (rank {rank})' if rank else ''}: {' '.join(describe(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
