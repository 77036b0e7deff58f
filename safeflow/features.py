"""Hidden states and labels in chunks, streamed from disk: what ``fit`` trains on.

A :class:`FeatureDataset` holds the labels y [N] in memory and the hidden states H [N, d] as
*chunks*: ranges of rows of memory-mapped safetensors files (features files, chunked feature
directories, or the hidden-state cache), or of an in-memory tensor. Every constraint set's
``fit`` accepts one in place of ``(H, y)``:

* **statistics in one streaming pass** — mean, per-dimension standard deviation and the input
  covariance, merged chunk by chunk in float64 (:class:`Moments`, the parallel form of Welford's
  update);
* **minibatches in shuffled chunk order** — each epoch visits the chunks in a random order and
  the rows of each chunk in a random order, filling batches across chunk boundaries, so at most
  two chunks and one batch are in memory: peak memory O(batch + chunk), not O(N).

With a single chunk the order is one random permutation of all rows, the in-memory order of
``fit(H, y)``; with the same chunk sizes and seed, a dataset on disk and the same rows in
memory (:meth:`FeatureDataset.from_tensors`) give the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .cache import HiddenStateCache
from .checks import as_features, as_labels
from .errors import ConfigError, CorruptFileError, DataError
from .io import save_tensors

#: Rows per block of the statistics pass (bounds its float64 temporaries to 2 × 8192 × d).
STATS_BLOCK = 8192


@dataclass
class Moments:
    """Count ``n``, mean [d] and scatter matrix ``m2`` = Σ (x − mean)(x − mean)ᵀ [d, d], float64."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, X: torch.Tensor) -> Moments:
        """Moments of the rows of X [n, d] (computed in float64 on X's device)."""
        X = X.double()
        mean = X.mean(0)
        centred = X - mean
        return cls(X.shape[0], mean, centred.T @ centred)

    def merge(self, other: Moments) -> Moments:
        """Moments of the union (Chan, Golub & LeVeque's pairwise update)."""
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2.to(self.m2.device) + torch.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def standardization(self, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population std [d] as float32 (std floored at ``eps``)."""
        std = (self.m2.diagonal() / self.n).clamp_min(0).sqrt()
        return self.mean.float(), std.float().clamp_min(eps)

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance [d, d] float64 (zeros for fewer than two rows)."""
        return self.m2 / (self.n - 1) if self.n > 1 else torch.zeros_like(self.m2)


def moments(chunks: Iterable[torch.Tensor], device: torch.device | str | None = None) -> Moments:
    """:class:`Moments` of all rows of ``chunks`` (each [n_i, d]), one chunk in memory at a time,
    in blocks of at most :data:`STATS_BLOCK` rows."""
    total: Moments | None = None
    for X in chunks:
        for block in X.split(STATS_BLOCK):  # bounds the float64 temporaries
            m = Moments.of(block.to(device) if device is not None else block)
            total = m if total is None else total.merge(m)
    if total is None:
        raise DataError("no rows to compute statistics of; pass at least one row")
    return total


@dataclass(frozen=True)
class _Chunk:
    """Rows ``start:stop`` of tensor ``hidden`` in file ``path`` (None: the in-memory tensor), or
    the selection ``rows`` of a cache chunk file, taking one ``layer`` of its [n, L, d] rows."""

    path: Path | None
    start: int
    stop: int
    rows: torch.Tensor | None = None
    layer: int | None = None

    def __len__(self) -> int:
        return self.stop - self.start if self.rows is None else len(self.rows)


class FeatureDataset:
    """Hidden states [N, d] in chunks with labels y [N] (1 = unsafe, 0 = safe); see the module doc.

    Build one with :meth:`from_files`, :meth:`from_cache` or :meth:`from_tensors`; write one
    with :func:`write_chunks`. ``len(ds)`` is N, ``ds.dim`` is d, ``ds.chunk_sizes`` the rows
    per chunk in order (row i of the dataset is row i of the concatenated chunks).
    """

    def __init__(self, chunks: Sequence[_Chunk], labels: torch.Tensor, dim: int, tensor: torch.Tensor | None = None) -> None:
        self._chunks = list(chunks)
        self.labels = labels
        self.dim = dim
        self._tensor = tensor
        self.chunk_sizes = [len(c) for c in self._chunks]
        self._offsets = np.cumsum([0] + self.chunk_sizes).tolist()
        if self._offsets[-1] != len(labels):
            raise DataError(f"{self._offsets[-1]} rows of hidden states but {len(labels)} labels; "
                            "pass one label per row")

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, H: Any, y: Any, chunk_rows: int | None = None, input_dim: int | None = None) -> FeatureDataset:
        """The rows of an in-memory H [N, d] with labels y [N], in chunks of ``chunk_rows``
        (default: one chunk — the order of ``fit(H, y)``); ``input_dim``: the d H must have."""
        H = as_features(H, input_dim).float()
        y = as_labels(y, H.shape[0])
        step = H.shape[0] if chunk_rows is None else chunk_rows
        _check_chunk_rows(step)
        chunks = [_Chunk(None, s, min(s + step, H.shape[0])) for s in range(0, H.shape[0], step)]
        return cls(chunks, y, H.shape[1], tensor=H)

    @classmethod
    def from_files(cls, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                   chunk_rows: int | None = None) -> FeatureDataset:
        """Features files (``hidden`` [n, d] and ``labels`` [n], as written by ``safeflow extract``
        or :func:`write_chunks`), in order; a directory stands for its ``*.safetensors`` files in
        name order. Each file is one chunk, or several of ``chunk_rows`` rows each. Only headers
        and labels are read now."""

        files = feature_paths(paths)
        chunks, labels, dims = [], [], set()
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    if "hidden" not in f.keys() or "labels" not in f.keys():
                        raise DataError(f"{path} is not a features file (needs tensors 'hidden' and 'labels'); "
                                        "create it with `safeflow extract` or write_chunks")
                    shape = f.get_slice("hidden").get_shape()
                    y = f.get_tensor("labels")
            except (SafetensorError, OSError) as exc:
                raise CorruptFileError(f"{path} is not a readable safetensors file ({exc}); it may be truncated: "
                                       "re-create it") from None
            if len(shape) != 2 or shape[0] != len(y):
                raise DataError(f"{path}: hidden has shape {shape} for {len(y)} labels; expected [n, d] with one label per row")
            dims.add(shape[1])
            step = shape[0] if chunk_rows is None else chunk_rows
            _check_chunk_rows(step)
            chunks += [_Chunk(path, s, min(s + step, shape[0])) for s in range(0, shape[0], step)]
            labels.append(y)
        if len(dims) != 1:
            raise DataError(f"the files have different hidden sizes {sorted(dims)}; use features of one model and layer")
        y = torch.cat(labels)
        return cls(chunks, as_labels(y, len(y)), dims.pop())

    @classmethod
    def from_cache(cls, cache: HiddenStateCache, keys: Sequence[str], labels: Any, layer: int = 0) -> FeatureDataset:
        """The rows of ``keys`` in a hidden-state cache, read in place: one chunk per cache chunk
        file, ``layer`` indexing the cache's layers (0 for a one-layer extraction). Rows are
        grouped by chunk file, so the dataset's row order is not the order of ``keys``: the
        labels travel with their rows. See :meth:`~safeflow.extractors.HFExtractor.dataset`."""

        y = as_labels(labels, len(keys))
        lost = cache.missing(keys)
        if lost:
            raise DataError(f"{len(lost)} of the rows are not in the cache {cache.directory}; extract them first "
                            "(HFExtractor.fill_cache)")
        by_path: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            path, row = cache.location(key)
            by_path.setdefault(path, []).append((i, row))
        chunks, order = [], []
        for path in sorted(by_path):
            chunks.append(_Chunk(path, 0, 0, rows=torch.tensor([r for _, r in by_path[path]]), layer=layer))
            order += [i for i, _ in by_path[path]]
        return cls(chunks, y[order], cache.row_shape[-1])

    # --- reading ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> torch.Tensor:
        """Chunk ``i``'s hidden states [n_i, d], float32: read from disk (only that chunk's bytes
        of the memory-mapped file) to the CPU, or a view of the in-memory tensor."""
        c = self._chunks[i]
        if c.path is None:
            assert self._tensor is not None
            X = self._tensor[c.start : c.stop]
        else:
            try:
                with safe_open(str(c.path), framework="pt") as f:
                    X = f.get_slice("hidden")[c.start : c.stop] if c.rows is None else f.get_tensor("hidden")[c.rows]
            except (SafetensorError, OSError) as exc:
                raise CorruptFileError(f"{c.path} became unreadable ({exc}); re-create it") from None
            if c.layer is not None:
                X = X[:, c.layer]
        X = X.float()
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise DataError(f"chunk {i} ({c.path or 'memory'}) has shape {tuple(X.shape)}, expected [n, {self.dim}]")
        return X

    def chunks(self) -> Iterator[torch.Tensor]:
        """Every chunk's hidden states in order, one at a time, checked like ``fit``'s tensors
        (finite, bounded: :func:`~safeflow.checks.as_features`)."""

        for i in range(len(self._chunks)):
            yield as_features(self.read(i), self.dim, name=f"chunk {i} ({self._chunks[i].path or 'memory'})")

    def labelled_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(H_i, y_i)`` for every chunk in order (labels on the rows' device)."""
        for i, X in enumerate(self.chunks()):
            yield X, self.labels[self._offsets[i] : self._offsets[i + 1]].to(X.device)

    def moments(self, device: torch.device | str | None = None) -> Moments:
        """Mean, std and covariance of all rows in one pass (:class:`Moments`), in blocks of
        :data:`STATS_BLOCK` rows: no float64 copy of H is ever made."""
        return moments([self._tensor] if self._tensor is not None else self.chunks(), device)

    def batches(self, batch_size: int, generator: torch.Generator,
                device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of minibatches ``(H_b [≤ batch_size, d], y_b)`` in shuffled chunk order.

        The generator draws the chunk order (only if there are several chunks), then, chunk by
        chunk, a permutation of its rows; batches are filled across chunk boundaries. With one
        chunk this is ``torch.randperm(N)`` cut into batches.
        """
        sizes = self.chunk_sizes
        order = torch.randperm(len(sizes), generator=generator).tolist() if len(sizes) > 1 else [0]
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows of a chunk tensor, their labels)
        filled = 0
        for c in order:
            perm = torch.randperm(sizes[c], generator=generator)
            if self._tensor is not None:  # index the tensor directly: no copy of the chunk
                source, rows = self._tensor, perm + self._chunks[c].start
            else:
                source, rows = self.read(c), perm
            labels = self.labels[self._offsets[c] + perm]
            taken = 0
            while taken < len(perm):
                n = min(batch_size - filled, len(perm) - taken)
                pending.append((source[rows[taken : taken + n].to(source.device)], labels[taken : taken + n]))
                taken += n
                filled += n
                if filled == batch_size:
                    yield _assemble(pending, device)
                    pending, filled = [], 0
        if pending:
            yield _assemble(pending, device)


def write_chunks(directory: str | os.PathLike[str], chunks: Iterable[tuple[torch.Tensor, Any]],
                 header: dict[str, Any] | None = None) -> list[Path]:
    """Write ``(H_i [n_i, d], y_i [n_i])`` pairs as features files ``part-00000.safetensors``, ...
    in ``directory`` (atomically, one at a time); read them back with :meth:`FeatureDataset.from_files`."""
    paths = []
    for i, (H, y) in enumerate(chunks):
        path = Path(directory) / f"part-{i:05d}.safetensors"
        save_tensors(path, {"hidden": torch.as_tensor(H).float(), "labels": torch.as_tensor(y).long()},
                     {"part": i, **(header or {})})
        paths.append(path)
    return paths


def _assemble(pieces: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    H = pieces[0][0] if len(pieces) == 1 else torch.cat([h for h, _ in pieces])
    y = pieces[0][1] if len(pieces) == 1 else torch.cat([y for _, y in pieces])
    return (H, y) if device is None else (H.to(device), y.to(device))


def feature_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The features files named by ``paths``: a file, a directory (its ``*.safetensors`` files in
    name order) or a sequence of either. Raises :class:`~safeflow.errors.DataError` for a directory
    without features files or an empty selection, :class:`FileNotFoundError` for a path that does
    not exist."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise DataError(f"{p} holds no .safetensors files; write some with write_chunks or `safeflow extract`")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; pass features files or a directory of them")
    if not files:
        raise DataError("no features files given")
    return files


def _check_chunk_rows(step: int) -> None:
    if not isinstance(step, int) or step < 1:
        raise ConfigError(f"chunk_rows must be a positive int, got {step!r}")
