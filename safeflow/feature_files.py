"""The features file: hidden states of a prompt set, as ``safeflow extract`` writes them and
``safeflow train`` / ``safeflow eval`` read them.

A features file is a safetensors file (written atomically by :func:`safeflow.io.save_tensors`)
with two tensors,

* ``hidden`` — H [N, d] float32, one row per prompt (or per response state);
* ``labels`` — y [N] int64, 1 = unsafe, 0 = safe;

and a JSON header. The header holds the source of the rows
(:func:`safeflow.provenance.describe_source`: model, its fingerprint, layer, pooling, ...) and,
row by row where present, these columns of N entries each:

* ``sources`` — the prompt source of each row;
* ``categories`` — the harm category of each row (absent when the prompt set has none);
* ``split`` — ``"train"`` or ``"test"`` per row (``extract --test-fraction``), with
  ``test_fraction`` and ``split_seed``.

Response-state files (``extract --responses N``) add ``responses`` (N), ``rows: "responses"``
and ``kinds`` (what each state is). A directory of features files (:func:`write_chunks
<safeflow.features.write_chunks>`) is streamed by :class:`~safeflow.features.FeatureDataset`.
:func:`training_rows` reads what ``safeflow train`` fits on, either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, DataError
from .features import FeatureDataset, feature_paths
from .io import load_tensors, read_header, save_tensors
from .provenance import source_of

if TYPE_CHECKING:
    from .data import PromptSet

__all__ = ["GROUP_COLUMNS", "SPLIT_PARTS", "TrainingRows", "read_features", "row_columns", "row_groups", "row_split",
           "split_rows", "stream_source", "take_rows", "training_rows", "write_features"]

#: Header columns that group the rows (per-group detection metrics), by their key in the metrics.
GROUP_COLUMNS = ("sources", "categories")
#: The parts a row can be in (the header's ``split``), and ``"all"`` (every row).
SPLIT_PARTS = ("train", "test", "all")


def read_features(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Hidden states H [N, d], labels y [N] and the header of the features file ``path``.

    Raises :class:`~safeflow.errors.DataError` if the file does not hold ``hidden`` and
    ``labels`` of matching shapes (e.g. a constraint-set file), and what
    :func:`safeflow.io.load_tensors` raises for an unreadable or corrupt file."""
    tensors, header = load_tensors(path)
    H, y = tensors.get("hidden"), tensors.get("labels")
    if H is None or y is None:
        raise DataError(f"{path} is not a features file; create one with `safeflow extract`")
    if H.ndim != 2 or y.ndim != 1 or len(y) != len(H):
        raise DataError(f"{path} holds hidden {tuple(H.shape)} and labels {tuple(y.shape)}; re-create it with "
                        "`safeflow extract`")
    return H, y, header


def write_features(path: str | os.PathLike[str], H: torch.Tensor, y: torch.Tensor, header: dict[str, Any]) -> None:
    """Write H [N, d] and y [N] with ``header`` (see the module doc) as the features file ``path``,
    atomically (a previous file there is unchanged if writing fails)."""
    save_tensors(path, {"hidden": H, "labels": y}, header)


def row_columns(data: PromptSet, rows: Sequence[int], split: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The per-row header columns of a features file whose row j holds prompt ``rows[j]`` of
    ``data``: ``sources``, ``categories`` (only if ``data`` has any) and, given the per-prompt
    ``split`` (``"train"``/``"test"`` for each prompt of ``data``), ``split``."""
    columns = {"sources": [data.sources[i] for i in rows]}
    if any(data.categories):
        columns["categories"] = [data.categories[i] for i in rows]
    if split is not None:
        columns["split"] = [split[i] for i in rows]
    return columns


def row_split(header: dict[str, Any], n: int, path: str | os.PathLike[str]) -> list[str] | None:
    """The per-row ``"train"``/``"test"`` split of a features file of ``n`` rows
    (``extract --test-fraction``), or None if it has none. Raises
    :class:`~safeflow.errors.DataError` for a split of the wrong length or with other values."""
    split = header.get("split")
    if split is None:
        return None
    if not isinstance(split, list) or len(split) != n or not set(split) <= {"train", "test"}:
        raise DataError(f"{path} has a malformed train/test split in its header; re-create it with `safeflow extract`")
    return split


def split_rows(split: list[str] | None, part: str) -> list[int] | None:
    """Indices of the rows in ``part`` (``"train"``, ``"test"``) of ``split``; None (every row)
    for ``part == "all"`` or a file without a split."""
    return None if part == "all" or split is None else [i for i, s in enumerate(split) if s == part]


def take_rows(H: torch.Tensor, y: torch.Tensor, rows: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of H [N, d] and y [N] (None: all of them, not copied)."""
    return (H, y) if rows is None else (H[rows], y[rows])


def row_groups(header: dict[str, Any], n: int) -> dict[str, list[Any]]:
    """The group columns (:data:`GROUP_COLUMNS`) of a features file of ``n`` rows that it has: each
    a list of ``n`` values, by column name. A column of another length, or with no non-empty value,
    is left out."""
    groups = {}
    for column in GROUP_COLUMNS:
        values = header.get(column) or []
        if len(values) == n and any(values):
            groups[column] = values
    return groups


def stream_source(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """The common source (:func:`~safeflow.provenance.source_of`) of the features file(s) at
    ``path`` (a file or a directory of them), read from their headers only; ``{}`` for none.

    Streaming trains on every row, so a file with a train/test split raises
    :class:`~safeflow.errors.ConfigError`; files from different sources (model, layer, setting)
    raise :class:`~safeflow.errors.DataError`."""
    files = feature_paths(path)
    headers = [read_header(f)[1] for f in files]
    for f, header in zip(files, headers):
        if header.get("split") is not None:
            raise ConfigError(f"{f} holds a train/test split (extract --test-fraction), but --chunk-rows trains on "
                              "every row; train without --chunk-rows, or extract without --test-fraction")
    sources = [source_of(h) for h in headers]
    for f, src in zip(files[1:], sources[1:]):
        if src != sources[0]:
            raise DataError(f"{f} was extracted from another model, layer or setting than the first file in {path} "
                            f"({src} vs {sources[0]}); train on features of one source")
    return sources[0] if sources else {}


@dataclass(frozen=True)
class TrainingRows:
    """The rows a constraint set is trained on (:func:`training_rows`): ``H`` hidden states
    [N, d] or a streamed :class:`~safeflow.features.FeatureDataset`; ``y`` labels [N] (None when
    streamed: the dataset carries them); ``test`` the held-out ``(H, y)`` of a file with a
    train/test split (None without one); ``source`` the rows' provenance
    (:func:`~safeflow.provenance.source_of`). ``len()`` is N."""

    H: torch.Tensor | FeatureDataset
    y: torch.Tensor | None
    test: tuple[torch.Tensor, torch.Tensor] | None
    source: dict[str, Any]

    def __len__(self) -> int:
        return len(self.H)


def training_rows(path: str | os.PathLike[str], chunk_rows: int | None = None) -> TrainingRows:
    """The training rows of the features at ``path``. With ``chunk_rows``: a
    :class:`~safeflow.features.FeatureDataset` streamed from the file or directory of files in
    chunks of that many rows, never loaded whole (every row trains: :func:`stream_source`).
    Without: one file loaded whole, its ``train`` rows (:func:`row_split`; all rows where it has no
    split) with its ``test`` rows held out; a directory then raises
    :class:`~safeflow.errors.DataError`."""
    if chunk_rows:
        data = FeatureDataset.from_files(path, chunk_rows=chunk_rows)
        return TrainingRows(data, None, None, stream_source(path))
    if Path(path).is_dir():
        raise DataError(f"{path} is a directory; stream its feature files with --chunk-rows N, "
                        "or pass one features file")
    H, y, header = read_features(path)
    split = row_split(header, len(y), path)
    H_train, y_train = take_rows(H, y, split_rows(split, "train"))
    test = take_rows(H, y, split_rows(split, "test")) if split else None
    return TrainingRows(H_train, y_train, test, source_of(header))
