"""Speed ratios on a shared machine: interleaved runs, the median of the per-round ratios and its spread.

On a machine shared with other work, two timings taken minutes apart see different neighbours, so a
ratio of two medians can be off by 2-5x. Here the candidates run interleaved (A B A B ..., or
A B C A B C ... for three), one call each per round, at least 15 rounds after a warm-up; each round
gives one ratio ``time(reference) / time(candidate)`` (> 1: the candidate is faster) from calls
taken seconds apart, and the figure is the median of those ratios with its interquartile range and
its min-max. A busy neighbour then widens the spread instead of moving the figure. Every call is
also timed by the CPU time of the process (``time.process_time``), which excludes the time spent
waiting for a core; its ratios are reported beside the wall-clock ones. Every run records the
machine: CPU model, cores, the load average before and after, torch and its threads.

Run ``python benchmarks/pairs.py`` (``make bench`` does, after the pytest-benchmark suites). The
comparisons, by group (``--only``):

* ``safeflow``: one SafeFlow call (default preset) with the compiled CPU kernel vs eager PyTorch, on
  held-out harmful states outside the refusal polytope, B = 1 and 8;
* ``steer``: one projection steer call (default preset, native solver, compiled) vs the same with
  cvxpylayers, vs the eager native rounds and vs the SafeFlow call, on the same states, B = 1 and 8;
* ``project``: one ``project`` call, native (compiled) vs cvxpylayers vs native eager, random
  problems with about half of the constraints violated (d = 576, B in {1, 32}, K in {14, 50});
* ``tokens``: per-token latency of a 16-token greedy generation at batch 1, unsteered vs steered by
  the projection (native) and by SafeFlow, on a prompt whose state is outside the refusal polytope.

The refusal polytope (d 576, K 14, F 4096) and the held-out states are built from the default model
as in ``conftest.py`` (a few minutes), or read from ``--constraints`` / ``--states`` (``--save``
writes both for the next run). One torch thread throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import safeflow as sf
from safeflow.io import load_tensors, save_tensors

LAYER = 20
NEW_TOKENS = 16


def machine() -> dict[str, object]:
    """What the figures were measured on: CPU model, cores, load average, torch, threads, Python, date."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


@dataclass
class Comparison:
    """Interleaved timings (seconds) of named candidates and the per-round ratios against the reference."""

    name: str
    reference: str
    times: dict[str, list[float]]  #: wall clock
    cpu_times: dict[str, list[float]] = field(default_factory=dict)  #: CPU time of the process
    ratios: dict[str, list[float]] = field(default_factory=dict)  #: time(reference) / time(candidate), per round
    cpu_ratios: dict[str, list[float]] = field(default_factory=dict)  #: the same by CPU time
    load_before: float = 0.0
    load_after: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Medians of the times and, per candidate, the median ratio with its IQR and min-max."""
        out: dict[str, Any] = {"name": self.name, "reference": self.reference, "rounds": len(self.times[self.reference]),
                                  "load_average_1min": [self.load_before, self.load_after],
                                  "median_ms": {k: 1e3 * statistics.median(v) for k, v in self.times.items()},
                                  "median_cpu_ms": {k: 1e3 * statistics.median(v) for k, v in self.cpu_times.items()}}
        for key, ratios in (("ratios", self.ratios), ("cpu_ratios", self.cpu_ratios)):
            stats = {}
            for k, r in ratios.items():
                q1, med, q3 = _quartiles(r)
                stats[k] = {"median": med, "iqr": [q1, q3], "min_max": [min(r), max(r)]}
            out[key] = stats
        return out

    def lines(self) -> list[str]:
        s = self.summary()
        times = ", ".join(f"{k} {v:.3g} ms" for k, v in s["median_ms"].items())
        cpu = ", ".join(f"{k} {v:.3g} ms" for k, v in s["median_cpu_ms"].items())
        rows = [f"{self.name} ({s['rounds']} rounds; load {self.load_before:.1f} -> {self.load_after:.1f}): wall {times}; "
                f"CPU {cpu}"]
        for clock, key in (("wall", "ratios"), ("CPU", "cpu_ratios")):
            for k, v in s[key].items():
                rows.append(f"    {clock:4s} {self.reference} / {k}: median {v['median']:.3g}x  IQR {v['iqr'][0]:.3g}-"
                            f"{v['iqr'][1]:.3g}x  min-max {v['min_max'][0]:.3g}-{v['min_max'][1]:.3g}x")
        return rows


def interleave(name: str, candidates: dict[str, Callable[[], object]], reference: str, rounds: int = 15,
               warmup: int = 2) -> Comparison:
    """Call every candidate once per round, in order, ``rounds`` times after ``warmup`` untimed rounds.

    ``candidates`` maps names to zero-argument callables; ``reference`` names the one the others
    are compared with (its time over theirs, per round).
    """
    if rounds < 15:
        raise ValueError(f"the protocol takes at least 15 rounds, got {rounds}")
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    result = Comparison(name, reference, {k: [] for k in candidates}, {k: [] for k in candidates},
                        load_before=os.getloadavg()[0])
    for _ in range(rounds):
        for k, fn in candidates.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            result.times[k].append(time.perf_counter() - t0)
            result.cpu_times[k].append(time.process_time() - c0)
    result.load_after = os.getloadavg()[0]
    for times, ratios in ((result.times, result.ratios), (result.cpu_times, result.cpu_ratios)):
        ref = times[reference]
        ratios.update({k: [r / max(t, 1e-9) for r, t in zip(ref, v)] for k, v in times.items() if k != reference})
    return result


@contextmanager
def backend_of(constraints: Any, name: str) -> Iterator[None]:
    """Run with the polytope's kernel backend set to ``name``."""
    before = constraints.backend
    constraints.backend = name
    try:
        yield
    finally:
        constraints.backend = before


def steer_with(steerer: sf.Steerer, H: torch.Tensor, constraints: Any, backend: str) -> Callable[[], object]:
    def run() -> object:
        with backend_of(constraints, backend):
            return steerer.steer(H, constraints)
    return run


def refusal_setup(args: argparse.Namespace) -> tuple[Any, torch.Tensor, Any]:
    """The refusal polytope, held-out harmful prompt states outside it, and (model, tokenizer, texts) or None."""
    need_model = "tokens" in args.only
    if args.constraints and args.states and not need_model:
        return sf.ConstraintSet.load(args.constraints), load_tensors(args.states)[0]["H"], None
    torch.manual_seed(0)
    model, tok = sf.load_model(progress=False)
    prompts = sf.load_prompts("default")
    ext = sf.HFExtractor(model, tok, layer=LAYER, progress=False)
    if args.constraints:
        poly = sf.ConstraintSet.load(args.constraints)
    else:  # as conftest.refusal_polytope
        states = sf.response_states(ext, prompts.where(sources=["advbench"]).texts[::10][:48])
        poly = sf.PolytopeConstraints(states.H.shape[1], 14, 4096).fit(states.H, states.y, margin=20.0,
                                                                       feature_l1=0.01, progress=False)
    texts = prompts.where(sources=["advbench"]).texts[1::3][:60]  # held out from the polytope's prompts
    H = ext.extract(texts)
    outside = poly.violations(H).amax(1) > 0
    H, texts = H[outside], [t for t, o in zip(texts, outside.tolist()) if o]
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        poly.save(Path(args.save) / "refusal.safetensors")
        save_tensors(Path(args.save) / "heldout_outside.safetensors", {"H": H}, {})
    return poly, H, (model, tok, texts)


def _problem(B: int, K: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random constraints with about half of them violated at h0 (float64), as test_bench_projection."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, K, d, generator=g, dtype=torch.float64) / d**0.5
    h0 = torch.randn(B, d, generator=g, dtype=torch.float64)
    c = (A @ h0[..., None])[..., 0] + torch.randn(B, K, generator=g, dtype=torch.float64)
    return h0, A, c


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    report: dict[str, Any] = {"machine": machine(), "comparisons": []}
    comparisons: list[Comparison] = []

    def done(c: Comparison) -> None:
        comparisons.append(c)
        print("\n".join(c.lines()), flush=True)

    if "project" in args.only:
        for B in (1, 32):
            for K in (14, 50):
                h0, A, c = _problem(B, K, 576)
                done(interleave(f"project B{B} d576 K{K}", {
                    "native": lambda: sf.project(h0, A, c, margin=0.5, backend="cpu"),
                    "native eager": lambda: sf.project(h0, A, c, margin=0.5, backend="torch"),
                    "cvxpylayers": lambda: sf.project(h0, A, c, margin=0.5, solver="cvxpylayers"),
                }, reference="cvxpylayers", rounds=args.rounds))
    if {"safeflow", "steer", "tokens"} & set(args.only):
        poly, H, lm = refusal_setup(args)
        report["refusal_polytope"] = {"d": poly.input_dim, "K": poly.num_constraints,
                                      "F": int(poly.facets.shape[1]), "held_out_states_outside": len(H)}
        native, cvx = sf.ProjectionSteerer(solver="native"), sf.ProjectionSteerer(solver="cvxpylayers")
        eager_native = sf.ProjectionSteerer(solver="native", backend="torch")
        for B in args.batches:
            rows = H[:B]
            if "safeflow" in args.only:
                done(interleave(f"safeflow call b{B}", {
                    "cpu kernel": steer_with(sf.SafeFlowSteerer(backend="cpu"), rows, poly, "cpu"),
                    "eager": steer_with(sf.SafeFlowSteerer(backend="torch"), rows, poly, "torch"),
                }, reference="eager", rounds=args.rounds))
            if "steer" in args.only:
                steers = {"native": steer_with(native, rows, poly, "auto"),
                          "native eager rounds": steer_with(eager_native, rows, poly, "auto"),
                          "cvxpylayers": steer_with(cvx, rows, poly, "auto"),
                          "safeflow": steer_with(sf.SafeFlowSteerer(), rows, poly, "auto")}
                if args.skip_eager_rounds:
                    del steers["native eager rounds"]
                done(interleave(f"projection steer call b{B}", steers, reference="cvxpylayers", rounds=args.rounds))
                done(interleave(f"projection native vs safeflow b{B}", {
                    "native": steer_with(native, rows, poly, "auto"),
                    "safeflow": steer_with(sf.SafeFlowSteerer(), rows, poly, "auto"),
                }, reference="safeflow", rounds=args.rounds))
        if "tokens" in args.only and lm is not None:
            model, tok, texts = lm
            enc = tok([tok.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False,
                                               add_generation_prompt=True)], return_tensors="pt",
                      add_special_tokens=False)

            def generate(steerer: sf.Steerer | None) -> Callable[[], object]:
                def go() -> object:
                    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=tok.pad_token_id)
                    if steerer is None:
                        return model.generate(**enc, **kw)
                    with sf.steering(model, poly, steerer, layer=LAYER, first_n_tokens=None):
                        return model.generate(**enc, **kw)
                return go

            done(interleave("generation b1, 16 tokens", {
                "unsteered": generate(None), "projection native": generate(native),
                "safeflow": generate(sf.SafeFlowSteerer()),
            }, reference="unsteered", rounds=args.rounds, warmup=1))
    report["comparisons"] = [c.summary() for c in comparisons]
    report["machine_after"] = {"load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per comparison (>= 15)")
    p.add_argument("--only", nargs="+", default=["project", "safeflow", "steer", "tokens"],
                   choices=["project", "safeflow", "steer", "tokens"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes of the steer calls")
    p.add_argument("--skip-eager-rounds", action="store_true", help="leave the eager native rounds out of 'steer'")
    p.add_argument("--constraints", help="a saved refusal polytope (default: fit one on the default model)")
    p.add_argument("--states", help="saved held-out states outside it (a safetensors file with H [N, d], as --save writes)")
    p.add_argument("--save", help="folder to save the fitted polytope and the states in, for --constraints/--states")
    p.add_argument("--json", help="write the figures and the machine to this file")
    args = p.parse_args(argv)
    print("machine:", json.dumps(machine()), flush=True)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
