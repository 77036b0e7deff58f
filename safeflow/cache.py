"""On-disk cache of extracted hidden states, resumable after an interruption.

A cache directory holds chunk files ``chunk-<n>.safetensors``; each stores a tensor ``hidden``
[n, L, d] and, in its JSON header, the keys (sha256 of the input text) of its rows and the
fingerprint of the extraction settings. Chunks are written atomically as extraction proceeds, so
an interrupted run keeps every finished chunk and the next run computes only what is missing.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, CorruptFileError
from .io import load_tensors, save_tensors

log = logging.getLogger(__name__)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class HiddenStateCache:
    """Rows of hidden states keyed by input text, for one fixed extraction ``fingerprint``."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]) -> None:
        digest = hashlib.sha256(repr(sorted(fingerprint.items())).encode()).hexdigest()[:16]
        if Path(directory).exists() and not Path(directory).is_dir():
            raise ConfigError(f"cache directory {directory} is a file; pass a directory (or none)")
        self.directory = Path(directory) / digest
        self.fingerprint = {k: str(v) for k, v in fingerprint.items()}
        self._rows: dict[str, torch.Tensor] = {}
        self._next_chunk = 0
        self._load()

    def _load(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("chunk-*.safetensors")):
            number = path.stem.split("-", 1)[1]
            if number.isdigit():
                self._next_chunk = max(self._next_chunk, int(number) + 1)
            try:
                tensors, header = load_tensors(path)
                keys = header["keys"]
                hidden = tensors["hidden"]
                if not isinstance(keys, list) or len(keys) != hidden.shape[0]:
                    raise KeyError("row count")
            except (CorruptFileError, OSError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable cache chunk %s (%s); it will be recomputed", path, exc)
                continue
            self._rows.update(zip(keys, hidden))

    def get(self, text: str) -> torch.Tensor | None:
        return self._rows.get(text_key(text))

    def add(self, texts: list[str], hidden: torch.Tensor) -> None:
        """Store rows ``hidden`` [n, L, d] for ``texts`` and persist them as one new chunk."""
        keys = [text_key(t) for t in texts]
        path = self.directory / f"chunk-{self._next_chunk:06d}.safetensors"
        save_tensors(path, {"hidden": hidden}, {"keys": keys, "fingerprint": self.fingerprint})
        self._next_chunk += 1
        self._rows.update(zip(keys, hidden))

    def __len__(self) -> int:
        return len(self._rows)
