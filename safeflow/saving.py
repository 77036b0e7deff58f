"""Saving and loading fitted components: one safetensors file with a JSON header — never pickle.

A fitted component (a steerer with learned tensors, :class:`~safeflow.steerers.FittedSteerer`)
is an ``nn.Module`` registered under a name. Its file holds the module's ``state_dict`` and a
header ``{"type": name, "component": kind, "format_version": v, "config": {...},
"provenance": {...}}``. Loading checks the header, builds the module from ``config`` on the
meta device (no memory), compares the file's tensor names, shapes and dtypes with it, checks
every tensor is finite, and only then reads the tensors: a hostile or damaged file raises
:class:`~safeflow.errors.CorruptFileError` and costs no more memory than its own size.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .errors import ConfigError, CorruptFileError
from .io import FLOAT_DTYPES, load_tensors, read_header, save_tensors, short_repr
from .registry import Registry


class Saveable(Protocol):
    """Anything with ``save(path)``: a constraint set, a steerer."""

    def save(self, path: str | os.PathLike[str]) -> None: ...


def save_rescue_copy(obj: Saveable, path: str | os.PathLike[str]) -> Path:
    """Save ``obj`` into the temporary directory (:func:`tempfile.gettempdir`) as
    ``safeflow-rescued-<process id>-<file name of path>`` when ``path`` itself could not be written
    (a full disk), so a trained object is not lost; return where. An ``OSError`` of this save
    propagates (nowhere could be written)."""
    rescue = Path(tempfile.gettempdir()) / f"safeflow-rescued-{os.getpid()}-{Path(path).name}"
    obj.save(rescue)
    return rescue


def checked_provenance(provenance: Any, where: str) -> dict[str, Any]:
    """``provenance`` as plain JSON values, with ``layer`` (if recorded) an int: what both saving
    and loading require, so a saved file always loads. Raises :class:`ConfigError` (``where``
    names the object or file)."""
    try:
        clean = json.loads(json.dumps(provenance, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: provenance must hold JSON values (str, numbers, lists, dicts) only: {exc}") from None
    if not isinstance(clean, dict):
        raise ConfigError(f"{where}: provenance must be a dict, got {short_repr(provenance)}")
    layer = clean.get("layer")
    if layer is not None and type(layer) is not int:
        raise ConfigError(f"{where}: provenance['layer'] must be an int (a decoder block index), got {layer!r}")
    return clean


def save_component(path: str | os.PathLike[str], module: nn.Module, *, component: str, name: str,
                   config: dict[str, Any], provenance: dict[str, Any], format_version: int) -> None:
    """Write ``module``'s state and header (see the module doc) to ``path`` atomically."""
    header = {"type": name, "component": component, "format_version": format_version, "config": config,
              "provenance": checked_provenance(provenance, f"this {component}")}
    save_tensors(path, module.state_dict(), header)


def load_component(path: str | os.PathLike[str], registry: Registry, base: type, *, component: str,
                   readable_versions: tuple[int, ...]) -> Any:
    """Read a file written by :func:`save_component`: the registered class named in its header,
    built from its config, with its tensors and ``provenance`` attribute. Never executes code
    from the file; every problem is a :class:`CorruptFileError` naming the path."""
    specs, header = read_header(path)
    if header.get("component") != component:
        raise CorruptFileError(f"{path} is not a saved {component} (its header names a "
                               f"{short_repr(header.get('component', 'constraint set'))}); pass a file written by "
                               f"the {component}'s .save()")
    name, config, version = header.get("type"), header.get("config"), header.get("format_version")
    if version not in readable_versions or not isinstance(config, dict):
        raise CorruptFileError(f"{path} has an unsupported {component} header (format_version {short_repr(version)}; "
                               f"this safeflow reads {readable_versions}); re-create it with .save()")
    if not isinstance(name, str) or name not in registry.names():
        raise CorruptFileError(f"{path} holds an unknown {component} type {short_repr(name)} (known: "
                               f"{', '.join(registry.names())}); re-create it with .save()")
    cls = registry.get(name)
    if not (issubclass(cls, base) and issubclass(cls, nn.Module)):
        raise CorruptFileError(f"{path} names the {component} {name!r}, which is not a {base.__name__} with saved "
                               "tensors; pass a file written by a fitted component's .save()")
    try:
        provenance = checked_provenance(header.get("provenance", {}), str(path))
    except ConfigError as exc:
        raise CorruptFileError(f"{exc}; re-create it with .save()") from None
    if any(isinstance(v, (list, dict)) and len(v) > max(len(specs), 1) for v in config.values()):
        raise CorruptFileError(f"{path} has a config with more entries than the file has tensors; re-create it")
    try:
        with torch.device("meta"):
            expected = {k: (v.dtype, v.shape) for k, v in cls(**config).state_dict().items()}
    except Exception as exc:  # any failure to build from untrusted arguments means a bad file
        raise CorruptFileError(f"{path} has a config that does not build a {cls.__name__} "
                               f"({short_repr(str(exc), 200)}); re-create it with .save()") from None
    if set(expected) != set(specs):
        raise CorruptFileError(f"{path} holds tensors {sorted(specs)[:8]} but its config needs {sorted(expected)[:8]}; "
                               "re-create it with .save()")
    for key, (dtype, shape) in expected.items():
        spec = specs[key]
        if spec.shape != tuple(shape) or (spec.dtype in FLOAT_DTYPES) != dtype.is_floating_point:
            raise CorruptFileError(f"{path}: tensor {key!r} is {spec.dtype} {list(spec.shape)} but its config needs "
                                   f"{dtype} {list(shape)}; re-create it with .save()")
    tensors, _ = load_tensors(path)
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CorruptFileError(f"{path}: tensor {key!r} has NaN/inf values; fit it again and save it")
    obj: Any = cls(**config)
    obj.load_state_dict(tensors)
    obj.provenance = provenance
    return obj
