"""Shared fixtures for the benchmarks, and a summary of the ratios the targets are stated in.

Run with ``make bench`` (``OMP_NUM_THREADS=1 pytest benchmarks --benchmark-enable``).
"""

from __future__ import annotations

import platform

import pytest
import torch

import safeflow as sf

MEDIANS: dict[str, float] = {}
LAYER = 20


def record(benchmark, key: str, per: float = 1.0, stat: str = "median") -> None:
    """Remember the median (or another statistic) of ``benchmark`` divided by ``per`` under ``key``."""
    MEDIANS[key] = getattr(benchmark.stats.stats, stat) / per


@pytest.fixture(scope="session")
def default_model():
    torch.manual_seed(0)
    return sf.load_model(progress=False)


@pytest.fixture(scope="session")
def prompts():
    return sf.load_prompts("default")


@pytest.fixture(scope="session")
def polytope(default_model, prompts):
    """A width-16384 polytope on 400 training prompts (a short fit: realistic shapes and violations)."""
    model, tok = default_model
    data = prompts.where(sources=["advbench", "safeflow-everyday", "safeflow-instructions"]).subset(range(0, 1120, 3))
    H = sf.HFExtractor(model, tok, layer=LAYER, progress=False).extract(data.texts)
    return sf.PolytopeConstraints(H.shape[1], 14, 16384).fit(H, data.y, margin=20.0, feature_l1=0.01, epochs=20,
                                                              progress=False)


@pytest.fixture(scope="session")
def refusal_polytope(default_model, prompts):
    """A width-4096 refusal polytope (the steering set) on response states of 48 harmful prompts."""
    model, tok = default_model
    harmful = prompts.where(sources=["advbench"]).texts[::10][:48]
    ext = sf.HFExtractor(model, tok, layer=LAYER, progress=False)
    states = sf.response_states(ext, harmful)
    return sf.PolytopeConstraints(states.H.shape[1], 14, 4096).fit(states.H, states.y, margin=20.0, feature_l1=0.01,
                                                                   progress=False)


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("safeflow benchmark summary")
    tr.write_line(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                  f"torch {torch.__version__}, python {platform.python_version()}")
    for key, value in sorted(MEDIANS.items()):
        tr.write_line(f"{key:45s} {value * 1e3:10.2f} ms")
    # each ratio compares the same prompts with and without the hook
    pairs = {"check only (safe prompt)": "unsteered", "steered (prompt outside)": "unsteered (outside prompts)"}
    for b in (1, 8):
        for kind, base_kind in pairs.items():
            base, other = MEDIANS.get(f"token b{b} {base_kind}"), MEDIANS.get(f"token b{b} {kind}")
            if base and other:
                tr.write_line(f"ratio b{b} {kind:30s} {other / base:6.3f}x {base_kind}")
        # a token whose state is steered costs one unsteered token plus one steer call
        base, call = MEDIANS.get(f"token b{b} unsteered (outside prompts)"), MEDIANS.get(f"steer call b{b}")
        if base and call:
            tr.write_line(f"ratio b{b} {'steered token (token + call)':30s} {(base + call) / base:6.3f}x unsteered")
        call = MEDIANS.get(f"kern safeflow call b{b} t1 [cpu]")
        if base and call:
            tr.write_line(f"ratio b{b} {'steered token, cpu kernel':30s} {(base + call) / base:6.3f}x unsteered")
    # the projection (test_bench_projection.py): native vs cvxpylayers per call, steered tokens
    for key in sorted(k for k in MEDIANS if k.startswith("project B") and " native" in k):
        other = MEDIANS.get(key.replace(" native", " cvxpylayers"))
        if other:
            tr.write_line(f"ratio cvxpylayers/native {key[len('project '):].replace(' native', ''):32s} "
                          f"{other / MEDIANS[key]:8.1f}x")
    base = MEDIANS.get("projection bench token b1 unsteered")
    for mode in ("safeflow", "projection native", "projection cvxpylayers"):
        token, call = MEDIANS.get(f"projection bench token b1 {mode}"), MEDIANS.get(f"projection bench steer call b1 {mode}")
        if base and token:
            tr.write_line(f"ratio b1 {mode + ' steered generation':42s} {token / base:6.3f}x unsteered")
        if base and call:
            tr.write_line(f"ratio b1 {mode + ' steered token (token + call)':42s} {(base + call) / base:6.3f}x unsteered")
    # kernel backends: "kern <what> [<backend>]" against "kern <what> [torch]" (speed-up, > 1 is faster)
    for key, value in sorted(MEDIANS.items()):
        what, _, backend = key.rpartition(" [")
        eager = MEDIANS.get(f"{what} [torch]")
        if key.startswith("kern ") and eager and backend != "torch]":
            tr.write_line(f"speed-up {what:40s} [{backend:10s} {eager / value:6.2f}x torch")
