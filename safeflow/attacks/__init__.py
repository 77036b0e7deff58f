"""Jailbreak attacks, a resumable prompt cache and the attack-evaluation protocol."""

from .base import Attack, cache_file
from .cache import AttackCache, AttackPrompt
from .direct import DirectAttack
from .gcg import AdaptiveGCGAttack, GCGAttack
from .templates import TemplateAttack, load_templates

__all__ = ["AdaptiveGCGAttack", "Attack", "AttackCache", "AttackPrompt", "DirectAttack", "GCGAttack", "TemplateAttack",
           "cache_file", "load_templates"]
