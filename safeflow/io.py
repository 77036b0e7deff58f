"""Atomic file writes and safetensors files carrying a JSON header.

Nothing here unpickles: tensors go through safetensors, metadata through JSON. Reading checks the
safetensors header (8-byte little-endian length, then JSON) *before* any tensor is read, so a
hostile file can make us allocate no more than its own size.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CorruptFileError

METADATA_KEY = "safeflow"
#: Largest safetensors header we read (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000
#: Item size in bytes of each safetensors dtype code.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the safetensors header describes it: dtype code (``"F32"``, ...) and shape."""

    dtype: str
    shape: tuple[int, ...]


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temporary files ``.<name>.<pid>.<random>.tmp`` beside ``target`` left by a killed
    process (their pid no longer runs on this machine); return what was removed."""
    removed = []
    for tmp in target.parent.glob(glob.escape(_temp_prefix(target)) + "*.tmp"):
        pid = tmp.name[len(_temp_prefix(target)):].split(".")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _check_parent(target: Path) -> None:
    """Raise ``NotADirectoryError`` naming the file if a part of ``target``'s parent path is a file."""
    base = target.parent.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if base.exists() and not base.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"is a file, not a directory, so {target} cannot be created "
                                 "inside it; choose another path", str(base))


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path`` atomically.

    If the body raises, the temporary file is removed and any previous ``path`` is untouched.
    An ``OSError`` about the temporary file or naming no file (a full disk, say) is raised again
    naming ``path``.
    A new file gets the mode ``0o666`` minus the umask (like ``open``); an overwritten file keeps
    its mode. Temporary files are named ``.<name>.<pid>.<random>.tmp``; stale ones of killed
    processes are removed first.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(21, "is a directory; pass a file path inside it", str(target))
    _check_parent(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.parent / f"{_temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 minus the umask (writers such as safetensors may change it)
        yield tmp
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if target.exists() else mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if exc.errno is not None and exc.filename in (None, str(tmp), tmp):
            raise OSError(exc.errno, exc.strerror, str(target)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(obj: Any, **kwargs: Any) -> str:
    """Strict JSON: NaN and ±inf (not valid JSON) are written as ``null``."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` and a JSON-serialisable ``header`` to one safetensors file, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
        except SafetensorError as exc:  # an I/O error inside the writer: raise it as the OSError it is
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters (for error messages about untrusted input)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorSpec], dict[str, Any]]:
    """Read and check the headers of a file written by :func:`save_tensors`, without its tensors.

    Returns ``(specs, header)``: each tensor's :class:`TensorSpec` (checked against the file's
    size) and the safeflow JSON header. Raises :class:`CorruptFileError` naming the path and the
    problem for anything unreadable, ``FileNotFoundError`` / ``IsADirectoryError`` for a wrong path.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory; pass the path of a file written by safeflow (.save() or "
                                "`safeflow extract`)", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a file written by safeflow (.save() or "
                                "`safeflow extract`)")

    def corrupt(problem: str) -> CorruptFileError:
        return CorruptFileError(f"{path} {problem}; it may be truncated or corrupted: re-create it with .save()")

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt("is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise corrupt(f"is not a readable safetensors file (header length {n} exceeds the file)")
        raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError and over-long integers are ValueErrors
        raise corrupt("is not a readable safetensors file (its header is not valid JSON)") from None
    if not isinstance(doc, dict):
        raise corrupt("is not a readable safetensors file (its header is not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("has a malformed safetensors metadata block")
    data_bytes = size - 8 - n
    specs: dict[str, TensorSpec] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in doc.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ints = [*shape, begin, end]
            if dtype not in DTYPE_SIZES or not all(type(i) is int and i >= 0 for i in ints):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"has a malformed entry for tensor {short_repr(name)}") from None
        if not begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise corrupt(f"has tensor {short_repr(name)} of shape {short_repr(shape)} that does not fit the file")
        specs[name] = TensorSpec(dtype, tuple(shape))
        spans.append((begin, end))
    spans.sort()
    if any(b < a_end for (_, a_end), (b, _) in zip(spans, spans[1:])):
        raise corrupt("has overlapping tensors")
    if METADATA_KEY not in metadata:
        raise CorruptFileError(f"{path} has no safeflow header; it was not written by safeflow's .save()")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError):
        raise corrupt("has a malformed safeflow header") from None
    if not isinstance(header, dict):
        raise corrupt("has a malformed safeflow header (not a JSON object)")
    return specs, header


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`; return ``(tensors, header)``.

    The headers are checked first (:func:`read_header`), so no more than the file's size is
    allocated. Raises :class:`CorruptFileError` with the path and a fix for anything unreadable.
    """
    _, header = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({short_repr(str(exc), 200)}); it may be truncated or "
            "corrupted: "
            "re-create it with .save()"
        ) from None
    return tensors, header
