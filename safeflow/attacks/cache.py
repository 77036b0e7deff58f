"""A resumable cache of generated attack prompts: one JSONL file per attack configuration.

Line 1 is a header ``{"safeflow_attack_cache": 1, "config": {...}, "entries": n}``; each further
line is ``{"request": ..., "prompts": [AttackPrompt, ...]}`` for one finished request. The whole
file is rewritten atomically (temporary file + rename), so a file on disk is always complete; the
header's entry count catches a file cut short by hand. A file written under another
configuration is refused; :func:`~safeflow.attacks.cache_file` keeps configurations apart by naming files after a
digest of their configuration.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CorruptFileError, DataError
from ..io import write_text_atomic

HEADER_KEY = "safeflow_attack_cache"
FORMAT_VERSION = 1


@dataclass
class AttackPrompt:
    """One attack string.

    ``group`` is the split key of the 80/20 protocol: prompts that share a group always land on
    the same side (the template's name for ``"template"``, the request for the others).
    """

    attack: str  #: registered name of the attack that produced it
    request: str  #: the harmful request being attacked
    prompt: str  #: the user message to send (formatted through the chat template downstream)
    group: str  #: split key
    info: dict[str, Any] = field(default_factory=dict)  #: attack-specific details (loss, steps, seconds, ...)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: Any) -> AttackPrompt:
        """Rebuild from :meth:`to_json`'s dict; ``DataError`` if a field is missing or mistyped."""
        names = ("attack", "request", "prompt", "group")
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in names) \
                or not isinstance(row.get("info", {}), dict):
            raise DataError(f"not an attack prompt record: {str(row)[:120]!r}")
        return cls(row["attack"], row["request"], row["prompt"], row["group"], dict(row.get("info", {})))


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(config, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"attack configuration is not JSON-serialisable ({exc})") from None


def config_digest(config: dict[str, Any]) -> str:
    """First 12 hex digits of the sha256 of the canonical JSON of ``config``."""
    return hashlib.sha256(json.dumps(_canonical(config), sort_keys=True).encode()).hexdigest()[:12]


class AttackCache:
    """Attack prompts per request for one attack ``config``, persisted to the JSONL file ``path``.

    Raises :class:`ConfigError` if ``path`` was written under a different configuration and
    :class:`CorruptFileError` if it is not a complete, well-formed cache file.
    """

    def __init__(self, path: str | Path, config: dict[str, Any], save_every_s: float = 2.0) -> None:
        self.path = Path(path)
        self.config = _canonical(config)
        self.save_every_s = save_every_s
        self.entries: dict[str, list[AttackPrompt]] = {}
        self._saved_at = time.monotonic()
        self._unsaved = 0
        if self.path.exists():
            self._read()

    def _corrupt(self, what: str) -> CorruptFileError:
        return CorruptFileError(f"attack cache {self.path} is corrupt ({what}); delete it to regenerate the prompts")

    def _read(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"unreadable: {exc}") from None
        if not lines:
            raise self._corrupt("empty file, no header")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError as exc:
            raise self._corrupt(f"line 1 is not a JSON header: {exc}") from None
        if not isinstance(header, dict) or header.get(HEADER_KEY) != FORMAT_VERSION \
                or not isinstance(header.get("config"), dict) or not isinstance(header.get("entries"), int):
            raise self._corrupt("line 1 is not a safeflow attack-cache header")
        if header["config"] != self.config:
            raise ConfigError(
                f"attack cache {self.path} was made with configuration {json.dumps(header['config'], sort_keys=True)}, "
                f"not {json.dumps(self.config, sort_keys=True)}; pass another cache file (cache_file() names one per "
                "configuration) or delete this one"
            )
        for n, line in enumerate(lines[1:], 2):
            try:
                row = json.loads(line)
                request = row["request"]
                prompts = [AttackPrompt.from_json(p) for p in row["prompts"]]
            except (json.JSONDecodeError, KeyError, TypeError, DataError) as exc:
                raise self._corrupt(f"line {n} is not a cache entry: {exc}") from None
            if not isinstance(request, str) or request in self.entries:
                raise self._corrupt(f"line {n} repeats or lacks its request")
            self.entries[request] = prompts
        if len(self.entries) != header["entries"]:
            raise self._corrupt(f"the header promises {header['entries']} entries but {len(self.entries)} were found")

    def add(self, request: str, prompts: list[AttackPrompt]) -> None:
        """Record one finished request; persist if ``save_every_s`` has passed since the last save."""
        self.entries[request] = prompts
        self._unsaved += 1
        if time.monotonic() - self._saved_at >= self.save_every_s:
            self.save()

    def save(self) -> None:
        """Rewrite the file atomically with every entry so far (if any was added since the last save)."""
        if not self._unsaved and self.path.exists():
            return
        header = {HEADER_KEY: FORMAT_VERSION, "config": self.config, "entries": len(self.entries)}
        lines = [json.dumps(header, sort_keys=True)]
        lines += [json.dumps({"request": r, "prompts": [p.to_json() for p in ps]}) for r, ps in self.entries.items()]
        write_text_atomic(self.path, "\n".join(lines) + "\n")
        self._saved_at = time.monotonic()
        self._unsaved = 0
