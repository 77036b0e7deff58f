"""On-disk cache of extracted hidden states: resumable, shared by every rank, read lazily.

Layout: ``<cache_dir>/<digest>/`` for each extraction *fingerprint* (model, a sample of its
weights, layers, pooling, chat template, ...), holding ``fingerprint.json`` and chunk files
``chunk-r<rank>-<hash>.safetensors``. A chunk stores ``hidden`` [n, ...] — for variable-length
rows (response states) padded, with ``lengths`` [n]: row i is ``hidden[i, :lengths[i]]`` — and,
in its JSON header, the keys of its rows and the fingerprint.

* Chunks are written atomically (temporary file, then rename) by the process that computed them.
  The name carries the writer's rank and a hash of its keys, so concurrent writers never collide
  and an interrupted run keeps every finished chunk: the next run computes only what is missing.
* Opening reads chunk *headers* only and indexes key → (chunk, row); rows are read on demand
  from memory-mapped files (:meth:`HiddenStateCache.read`).
* A chunk whose fingerprint differs from the directory's is refused (:class:`DataError`); a
  truncated or unreadable chunk is renamed ``*.corrupt`` with a warning and its rows are
  recomputed. Rows of different extractions are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import ConfigError, CorruptFileError, DataError
from .io import METADATA_KEY, save_tensors, write_text_atomic

log = logging.getLogger(__name__)


def text_key(text: str) -> str:
    """The cache key of a row: sha256 of its input text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_digest(model: nn.Module, values: int = 32) -> str:
    """A cheap identity of a model's weights: sha256 of the first ``values`` entries of every
    parameter (parameters offloaded to the ``meta`` device are skipped). Two checkpoints with the
    same architecture — a base model and its fine-tune, two random seeds — get different digests."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:values].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class HiddenStateCache:
    """Rows of hidden states keyed by strings (see :func:`text_key`), for one extraction ``fingerprint``.

    Args:
        directory: the cache directory (a subdirectory per fingerprint is created inside).
        fingerprint: the settings that determine a row besides its key; values are compared as strings.
        rank: this process's rank, used in the names of the chunks it writes.
        ragged: rows have a variable first dimension (stored padded with ``lengths``).
    """

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any], rank: int = 0, ragged: bool = False) -> None:
        self.fingerprint = {k: str(v) for k, v in fingerprint.items()}
        digest = hashlib.sha256(repr(sorted(self.fingerprint.items())).encode()).hexdigest()[:16]
        if Path(directory).exists() and not Path(directory).is_dir():
            raise ConfigError(f"cache directory {directory} is a file; pass a directory (or none)")
        self.directory = Path(directory) / digest
        self.rank = rank
        self.ragged = ragged
        self._index: dict[str, tuple[Path, int]] = {}
        self._seen: set[Path] = set()
        self._row_shape: tuple[int, ...] | None = None
        self._check_fingerprint_file()
        self.refresh()

    # --- reading ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Index chunks not seen yet (for example written by other ranks since the last look)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("chunk-*.safetensors")):
            if path not in self._seen:
                self._seen.add(path)
                for row, key in enumerate(self._chunk_keys(path)):
                    self._index.setdefault(key, (path, row))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def location(self, key: str) -> tuple[Path, int]:
        """(chunk file, row) of ``key``; ``KeyError`` if it has no row."""
        return self._index[key]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one row without its first (ragged) dimension, e.g. (L, d); () while empty."""
        return self._row_shape or ()

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in order, without repeats) that have no row in the cache."""
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def read(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """The rows of ``keys`` in order, each chunk file opened once (memory-mapped).

        Raises :class:`DataError` if a key has no row, :class:`CorruptFileError` if a chunk became
        unreadable since it was indexed.
        """
        lost = self.missing(keys)
        if lost:
            raise DataError(f"{len(lost)} of {len(set(keys))} rows are not in the cache {self.directory}; "
                            "extract them first (HFExtractor.fill_cache or `safeflow extract --cache`)")
        by_chunk: dict[Path, list[tuple[int, int]]] = defaultdict(list)
        for i, key in enumerate(keys):
            path, row = self._index[key]
            by_chunk[path].append((i, row))
        out: list[torch.Tensor | None] = [None] * len(keys)
        for path, items in by_chunk.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    hidden = f.get_tensor("hidden")
                    lengths = f.get_tensor("lengths").tolist() if self.ragged else None
            except (SafetensorError, OSError) as exc:
                raise CorruptFileError(f"cache chunk {path} became unreadable ({exc}); delete it and rerun "
                                       "to recompute its rows") from None
            for i, row in items:
                out[i] = hidden[row, : lengths[row]].clone() if lengths is not None else hidden[row]
        return out  # type: ignore[return-value]

    # --- writing ------------------------------------------------------------------------
    def add(self, keys: Sequence[str], rows: Sequence[torch.Tensor]) -> Path:
        """Persist ``rows`` (one tensor per key; ragged caches: [n_i, ...]) as one new chunk."""
        keys = list(keys)
        if len(keys) != len(rows) or not keys:
            raise DataError(f"need one row per key and at least one; got {len(keys)} keys and {len(rows)} rows")
        if self.ragged:
            lengths = torch.tensor([r.shape[0] for r in rows])
            width = int(lengths.max())
            hidden = rows[0].new_zeros(len(rows), width, *rows[0].shape[1:])
            for i, r in enumerate(rows):
                hidden[i, : r.shape[0]] = r
            tensors = {"hidden": hidden, "lengths": lengths}
        else:
            tensors = {"hidden": torch.stack(list(rows))}
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        path = self.directory / f"chunk-r{self.rank:04d}-{name}.safetensors"
        if not (self.directory / "fingerprint.json").is_file():
            write_text_atomic(self.directory / "fingerprint.json", json.dumps(self.fingerprint, indent=2, sort_keys=True))
        save_tensors(path, tensors, {"keys": keys, "fingerprint": self.fingerprint})
        self._seen.add(path)
        for row, key in enumerate(keys):
            self._index.setdefault(key, (path, row))
        return path

    # --- checks -------------------------------------------------------------------------
    def _check_fingerprint_file(self) -> None:
        path = self.directory / "fingerprint.json"
        if not path.is_file():
            return
        try:
            recorded = json.loads(path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError):
            recorded = None
        if recorded != self.fingerprint:
            raise DataError(f"cache directory {self.directory} belongs to another extraction "
                            f"({_diff(recorded, self.fingerprint)}); it was copied or renamed there — "
                            "move it away or pass another cache_dir")

    def _chunk_keys(self, path: Path) -> list[str]:
        """The keys of chunk ``path`` after checking its header, fingerprint and shapes."""
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})[METADATA_KEY])
                shape = tuple(f.get_slice("hidden").get_shape())
                has_lengths = "lengths" in f.keys()
            keys, fingerprint = header["keys"], header["fingerprint"]
            if not isinstance(keys, list) or len(keys) != shape[0] or has_lengths != self.ragged:
                raise ValueError(f"keys do not match the {shape[0]} rows")
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("cache chunk %s is unreadable (%s); renamed to *.corrupt, its rows will be recomputed", path, exc)
            try:
                path.rename(path.with_name(path.name + ".corrupt"))
            except OSError:
                pass  # another rank moved it first
            return []
        if fingerprint != self.fingerprint:
            raise DataError(f"cache chunk {path} holds rows of another extraction ({_diff(fingerprint, self.fingerprint)}); "
                            "it was copied there from another cache — delete it or pass another cache_dir")
        row_shape = shape[2:] if self.ragged else shape[1:]
        if self._row_shape is None:
            self._row_shape = row_shape
        elif row_shape != self._row_shape:
            raise DataError(f"cache chunk {path} has rows of shape {row_shape}, other chunks {self._row_shape}; "
                            "the directory mixes extractions — delete it and re-extract")
        return keys


def _diff(recorded: Any, expected: dict[str, str]) -> str:
    """A short description of how two fingerprints differ."""
    if not isinstance(recorded, dict):
        return "no readable fingerprint"
    keys = sorted(set(recorded) | set(expected))
    parts = [f"{k}: {recorded.get(k)!r} here, {expected.get(k)!r} wanted" for k in keys if recorded.get(k) != expected.get(k)]
    return "; ".join(parts) or "same fingerprint"
