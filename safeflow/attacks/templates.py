"""Human-written jailbreak templates: the request is put into a template's ``{{ prompt }}`` slot.

The default templates ship in the pinned ``pyrit==1.1.0`` wheel under
``pyrit/datasets/jailbreak/templates/`` (YAML files whose ``value`` holds the template text and
marks the request's place with the Jinja placeholder ``{{ prompt }}``). Only the files listed in
``manifest.json`` (single-slot templates, sha256-verified) are used.

The templates are Jinja, and the collected ones protect their text with ``{% raw %} ...
{% endraw %}`` blocks (and a literal ``{% endraw %}`` as ``{{ "{% endraw %}" }}``). safeflow
renders exactly that subset itself — raw blocks verbatim, ``{{ prompt }}`` outside them replaced
by the request, string-literal expressions by their text — and refuses any other Jinja syntax;
no template code is ever executed.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from functools import cache
from typing import Any

import yaml

from ..assets import fetch_package, manifest
from ..errors import ConfigError
from .base import Attack, positive_int, request_seed
from .cache import AttackPrompt

#: The request's slot in a template: ``{{ prompt }}`` (spaces optional), as in PyRIT's templates.
PLACEHOLDER = re.compile(r"\{\{\s*prompt\s*\}\}")
_RAW = re.compile(r"\{%\s*raw\s*%\}(.*?)\{%\s*endraw\s*%\}", re.S)
_EXPRESSION = re.compile(r"""\{\{\s*(?:(prompt)|"([^"]*)"|'([^']*)')\s*\}\}""")
DEFAULT_SET = "pyrit-jailbreak"


@cache
def _pyrit_templates() -> tuple[tuple[str, str], ...]:
    spec = manifest()["attack_templates"][DEFAULT_SET]
    root = fetch_package(spec["package"], progress=False)
    directory = spec["directory"]
    out = []
    for member in sorted(manifest()["packages"][spec["package"]]["files"]):
        if member.startswith(directory) and member.endswith(".yaml"):
            doc = yaml.safe_load((root / member).read_text(encoding="utf-8"))
            out.append((member[len(directory):-len(".yaml")], str(doc["value"]).strip()))
    return tuple(out)


def load_templates(max_chars: int | None = None) -> dict[str, str]:
    """The default jailbreak templates, ``{name: text}`` (name: path under the templates folder,
    e.g. ``"aim"`` or ``"in_the_wild/trustairlab_00118a609b9a9e63"``), fetched on first use.

    ``max_chars``: keep only templates of at most this many characters (long ones cost prefill time).
    """
    return {name: text for name, text in _pyrit_templates() if max_chars is None or len(text) <= max_chars}


def _segments(template: str) -> list[tuple[bool, str]]:
    """``template`` as ``(verbatim, text)`` pieces: raw blocks are verbatim, the rest is rendered."""
    out, pos = [], 0
    for m in _RAW.finditer(template):
        out += [(False, template[pos:m.start()]), (True, m.group(1))]
        pos = m.end()
    return out + [(False, template[pos:])]


def check_template(name: str, template: str) -> None:
    """Raise :class:`ConfigError` unless ``template`` has a ``{{ prompt }}`` slot outside raw blocks
    and no Jinja syntax beyond raw blocks, the slot and string literals."""
    rendered = [text for verbatim, text in _segments(template) if not verbatim]
    if not any(PLACEHOLDER.search(text) for text in rendered):
        raise ConfigError(f"template {name!r} has no {{{{ prompt }}}} placeholder for the request; "
                          "write {{ prompt }} where the request goes")
    leftover = next((t for t in (_EXPRESSION.sub("", text) for text in rendered) if "{{" in t or "{%" in t), None)
    if leftover is not None:
        i = leftover.find("{{") if "{{" in leftover else leftover.find("{%")
        raise ConfigError(f"template {name!r} uses Jinja syntax safeflow does not render ({leftover[i:i + 40]!r}); "
                          "only {% raw %} blocks, {{ prompt }} and string literals are supported")


def fill(template: str, request: str) -> str:
    """Render ``template`` with ``request`` in every ``{{ prompt }}`` slot (plain text, no escapes)."""
    def expression(m: re.Match[str]) -> str:
        return request if m.group(1) else m.group(2) if m.group(2) is not None else m.group(3)

    return "".join(text if verbatim else _EXPRESSION.sub(expression, text) for verbatim, text in _segments(template))


class TemplateAttack(Attack, name="template"):
    """Each request wrapped in ``per_request`` templates drawn at random (seeded per request).

    Args:
        templates: ``{name: text}``, each with a ``{{ prompt }}`` placeholder; default: the
            PyRIT jailbreak templates of at most ``max_chars`` characters.
        per_request: templates applied to each request.
        max_chars: length cap for the default templates (None: all of them).
        seed: template choice.

    The split key of each prompt is ``"template:<name>"``, so the 80/20 protocol splits by
    template: a test template is never seen in training.
    """

    def __init__(self, templates: Mapping[str, str] | None = None, per_request: int = 1, max_chars: int | None = 4000,
                 seed: int = 0) -> None:
        self.per_request = positive_int("per_request", per_request)
        self.max_chars = max_chars if templates is None else None
        self.seed = seed
        self.templates = dict(templates) if templates is not None else load_templates(max_chars)
        if not self.templates:
            raise ConfigError("no templates to draw from; pass templates={name: text} or raise max_chars")
        for name, text in self.templates.items():
            if not isinstance(text, str):
                raise ConfigError(f"template {name!r} is not a string")
            check_template(name, text)
        if self.per_request > len(self.templates):
            raise ConfigError(f"per_request={per_request} exceeds the {len(self.templates)} templates available")
        self._names = sorted(self.templates)

    def attack_request(self, request: str) -> list[AttackPrompt]:
        rng = random.Random(request_seed(self.seed, request))
        return [AttackPrompt("template", request, fill(self.templates[name], request), group=f"template:{name}",
                             info={"template": name})
                for name in rng.sample(self._names, self.per_request)]

    def config(self) -> dict[str, Any]:
        digest = hashlib.sha256("\0".join(f"{n}\0{self.templates[n]}" for n in self._names).encode()).hexdigest()
        return {"attack": "template", "per_request": self.per_request, "max_chars": self.max_chars, "seed": self.seed,
                "templates": len(self.templates), "templates_sha256": digest}
