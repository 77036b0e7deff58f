"""Kernel backends by name: ``"torch"`` (eager reference), ``"cpu"``, ``"cuda"`` and ``"auto"``.

The compiled modules ``safeflow.kernels._cpu`` and ``_cuda`` are optional: a missing or broken
build, or ``SAFEFLOW_NO_EXT=1``, makes a request for them fall back to ``"torch"`` with one warning
per backend. :func:`available` lists only backends that loaded (and ``"cuda"`` only with a GPU).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from ..errors import ConfigError, DataError

NAMES = ("auto", "cpu", "cuda", "torch")
_modules: dict[str, ModuleType | None] = {}
_reasons: dict[str, str] = {}
_warned: set[str] = set()


def module(name: str) -> ModuleType | None:
    """The compiled module for ``"cpu"`` or ``"cuda"``, or None if it is unavailable (reason kept)."""
    if name not in _modules:
        if os.environ.get("SAFEFLOW_NO_EXT", "") not in ("", "0"):
            _modules[name], _reasons[name] = None, "SAFEFLOW_NO_EXT is set"
        else:
            try:
                _modules[name] = importlib.import_module(f"safeflow.kernels._{name}")
            except ImportError as exc:
                _modules[name] = None
                _reasons[name] = f"the compiled module safeflow.kernels._{name} did not load ({exc})"
        if name == "cuda" and _modules[name] is not None and not torch.cuda.is_available():
            _reasons[name] = "torch sees no CUDA device"
    return _modules[name]


def _usable(name: str) -> bool:
    return module(name) is not None and (name != "cuda" or torch.cuda.is_available())


def available() -> list[str]:
    """Backend names usable here: ``"torch"`` and ``"auto"`` always, ``"cpu"``/``"cuda"`` if loaded."""
    return sorted(n for n in NAMES if n in ("auto", "torch") or _usable(n))


def _fallback(name: str) -> str:
    if name not in _warned:
        _warned.add(name)
        fix = ("reinstall safeflow where a C++ compiler is present" if name == "cpu"
               else "reinstall safeflow where nvcc is present (set CUDA_HOME)")
        warnings.warn(f"safeflow kernel backend {name!r} is unavailable: {_reasons.get(name, 'not loaded')}; using "
                      f"the eager 'torch' backend instead. To fix, {fix}, or pass backend='torch' to silence this.",
                      RuntimeWarning, stacklevel=3)
    return "torch"


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def check_name(name: str) -> str:
    """``name`` if it is a kernel backend name, else :class:`ConfigError` listing the valid ones."""
    if name not in NAMES:
        raise ConfigError(f"unknown kernel backend {name!r}; valid names: {', '.join(map(repr, NAMES))}")
    return name


#: the state dtypes each compiled backend computes in
DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs for tensors on ``device``: ``"torch"``, ``"cpu"`` or ``"cuda"``.

    ``"auto"`` picks the compiled kernel of the device's type when it loaded and computes in
    ``dtype`` (if given), else ``"torch"``. A compiled backend that did not load falls back to
    ``"torch"`` (one warning); one that cannot serve the device raises :class:`DataError`. Under
    ``torch.func`` transforms every backend resolves to ``"torch"``.
    """
    if check_name(name) == "torch" or _functorch_active():
        return "torch"  # torch.func transforms (vmap, jacrev, ...) trace the eager expressions
    if name == "auto":
        want = device.type if device.type in ("cpu", "cuda") else "torch"
        if want == "torch" or (dtype is not None and dtype not in DTYPES[want]):
            return "torch"
        return want if _usable(want) else _fallback(want)
    if device.type != name:
        other = "cuda" if name == "cpu" else "cpu"
        raise DataError(f"kernel backend {name!r} cannot run on {device.type} tensors; move the constraint set and "
                        f"states to {name} (.to({name!r})), or use backend='auto' or {other!r}")
    return name if _usable(name) else _fallback(name)
