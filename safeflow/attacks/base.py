"""The ``Attack`` interface: turn harmful requests into attack prompts, resumably.

An attack maps one harmful request to one or more :class:`AttackPrompt` s (the user message to
send, plus what produced it). Results depend only on the attack's configuration and the request,
never on the order of requests, so a cached run that was interrupted resumes to exactly what an
uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..progress import progress_bar
from ..registry import Registered
from .cache import AttackCache, AttackPrompt, config_digest


def request_seed(seed: int, request: str) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``request`` (not on their order in a run)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{request}".encode()).digest()[:8], "big") >> 1


class Attack(Registered, ABC, kind="attack"):
    """Turns harmful requests into attack prompts: ``generate(requests) -> list[AttackPrompt]``.

    Implementations provide :meth:`attack_request` (one request) and :meth:`config` (everything
    that determines their output: the cache refuses prompts made with another configuration).
    """

    @abstractmethod
    def attack_request(self, request: str) -> list[AttackPrompt]:
        """Attack prompts for one ``request``; deterministic given :meth:`config`."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that determine the output (name, seed, budget, model ...)."""

    def generate(self, requests: Sequence[str], cache: str | Path | None = None, progress: bool = True,
                 save_every_s: float = 2.0) -> list[AttackPrompt]:
        """Attack every request (duplicates once), in order.

        ``cache``: a JSONL file (see :class:`~safeflow.attacks.cache.AttackCache`); finished
        requests are read from it and new ones written to it (atomically, at most every
        ``save_every_s`` seconds and when the run ends or is interrupted), so an interrupted run
        resumes without redoing finished requests.
        """
        requests = list(dict.fromkeys(requests))
        if not requests:
            raise DataError("no requests to attack; pass at least one harmful request")
        if not all(isinstance(r, str) and r.strip() for r in requests):
            raise DataError("every request must be a non-empty string; drop empty rows")
        store = AttackCache(cache, self.config(), save_every_s=save_every_s) if cache is not None else None
        done = store.entries if store is not None else {}
        name = self.registered_name or type(self).__name__
        bar = progress_bar(total=len(requests), initial=sum(r in done for r in requests), desc=f"attack {name}",
                   unit="request", disable=not progress)
        try:
            for request in requests:
                if request in done:
                    continue
                prompts = self.attack_request(request)
                if store is not None:
                    store.add(request, prompts)
                else:
                    done[request] = prompts
                bar.update(1)
        finally:
            bar.close()
            if store is not None:
                store.save()
        return [p for r in requests for p in done[r]]


def cache_file(directory: str | Path, attack: Attack) -> Path:
    """``directory/<name>-<config digest>.jsonl``: one file per attack configuration."""
    return Path(directory) / f"{attack.registered_name}-{config_digest(attack.config())}.jsonl"


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a ``ConfigError`` naming the budget setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}; a zero budget does not attack")
    return value
