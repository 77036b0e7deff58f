"""The baseline attack: the harmful request itself."""

from __future__ import annotations

from typing import Any

from .base import Attack
from .cache import AttackPrompt


class DirectAttack(Attack, name="direct"):
    """The request as the prompt, unchanged (HarmBench's "direct request")."""

    def attack_request(self, request: str) -> list[AttackPrompt]:
        return [AttackPrompt("direct", request, request, group=request)]

    def config(self) -> dict[str, Any]:
        return {"attack": "direct"}
