"""Facet interpretability: which facets of a constraint set fire for which category of prompt.

For hidden states ``H`` [N, d] with violations ``V = constraints.violations(H)`` [N, K], facet k
*fires* on row i iff ``V[i, k] > 0``. With the rows' categories ``c_i`` (C distinct), this module
reports

* ``counts`` [C, K] / ``rates`` [C, K]: rows of each category on which each facet fires;
* ``mutual_information`` [K, C] (bits): ``I(X_k; Y_c)`` between the binary indicators
  ``X_k = [V[:, k] > 0]`` and ``Y_c = [category == c]``, from the empirical 2×2 table;
* ``matching``: the one-to-one assignment of facets to categories maximising the summed MI
  (Hungarian algorithm, :func:`scipy.optimize.linear_sum_assignment`; at most min(K, C) pairs,
  pairs with zero MI left out);
* ``normal_cosine`` [K, K]: cosine similarity of the facet normals ``Φ_k`` in feature space
  (polytopes only), and ``jaccard`` [K, K]: ``|S_k ∩ S_j| / |S_k ∪ S_j|`` of the row sets
  ``S_k`` on which each facet fires;
* ``top_prompts``: per facet, the rows with the largest violation.

Rows without a category are left out of the category tables (with a note); without any category
the category analysis is skipped, not an error.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .constraints.base import ConstraintSet
from .data import PromptSet
from .errors import DataError

log = logging.getLogger(__name__)

#: Mutual information (bits) at or below which a facet–category pair is not matched.
MIN_MI = 1e-9


@dataclass
class FacetAnalysis:
    """Result of :func:`analyze_facets`. Arrays are numpy; categories index rows of ``counts`` /
    ``rates`` and columns of ``mutual_information``."""

    categories: list[str]
    totals: list[int]  # [C] rows per category
    counts: np.ndarray  # [C, K] rows of category c on which facet k fires
    rates: np.ndarray  # [C, K] counts / totals
    fire_rate: np.ndarray  # [K] share of all analysed rows on which facet k fires
    mutual_information: np.ndarray  # [K, C] bits
    matching: list[tuple[int, str, float]]  # (facet, category, MI in bits), by facet
    normal_cosine: np.ndarray | None  # [K, K]; None if the constraint set has no facet normals
    jaccard: np.ndarray  # [K, K]
    top_prompts: dict[int, list[dict[str, Any]]]  # facet -> [{"text", "category", "violation"}]
    num_rows: int
    notes: list[str] = field(default_factory=list)

    @property
    def num_facets(self) -> int:
        return len(self.fire_rate)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays as nested lists)."""
        def arr(a: np.ndarray | None) -> Any:
            return None if a is None else np.round(a, 6).tolist()

        return {"categories": self.categories, "totals": self.totals, "counts": arr(self.counts),
                "rates": arr(self.rates), "fire_rate": arr(self.fire_rate),
                "mutual_information": arr(self.mutual_information),
                "matching": [{"facet": k, "category": c, "mi_bits": round(mi, 6)} for k, c, mi in self.matching],
                "normal_cosine": arr(self.normal_cosine), "jaccard": arr(self.jaccard),
                "top_prompts": {str(k): v for k, v in self.top_prompts.items()}, "num_rows": self.num_rows,
                "notes": self.notes}


def binary_mutual_information(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``I(X_k; Y_c)`` in bits for binary indicators x [N, K] and y [N, C]; returns [K, C]."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = len(x)
    mi = np.zeros((x.shape[1], y.shape[1]))
    px, py = x.mean(0), y.mean(0)
    for a in (0, 1):
        xa = x if a else 1 - x
        pa = px if a else 1 - px
        for b in (0, 1):
            yb = y if b else 1 - y
            pb = py if b else 1 - py
            joint = xa.T @ yb / n  # [K, C]
            denom = np.outer(pa, pb)
            with np.errstate(divide="ignore", invalid="ignore"):
                term = joint * np.log2(joint / denom)
            mi += np.where(joint > 0, term, 0.0)
    return np.clip(mi, 0.0, None)


def jaccard(fires: np.ndarray) -> np.ndarray:
    """Jaccard similarity [K, K] of the row sets on which each facet fires (fires: bool [N, K]);
    1 on the diagonal, 0 for two facets that never fire."""
    f = fires.astype(np.float64)
    inter = f.T @ f
    union = f.sum(0)[:, None] + f.sum(0)[None, :] - inter
    out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    np.fill_diagonal(out, 1.0)
    return out


def facet_normal_cosine(constraints: ConstraintSet) -> np.ndarray | None:
    """Cosine similarity [K, K] of the facet normals ``Φ_k`` in feature space; None without ``facets``."""
    phi = getattr(constraints, "facets", None)
    if not isinstance(phi, torch.Tensor):
        return None
    phi = phi.detach().double().cpu()
    unit = phi / phi.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).numpy()


def match_facets(mi: np.ndarray, categories: list[str]) -> list[tuple[int, str, float]]:
    """One-to-one facets ↔ categories maximising the summed MI [K, C] (Hungarian); sorted by facet.
    Pairs without information (MI <= :data:`MIN_MI`, e.g. a facet that never fires) are left out."""
    from scipy.optimize import linear_sum_assignment  # local: scipy is a heavy import, needed only here

    rows, cols = linear_sum_assignment(mi, maximize=True)
    return sorted((int(k), categories[c], float(mi[k, c])) for k, c in zip(rows, cols) if mi[k, c] > MIN_MI)


@torch.no_grad()
def analyze_facets(constraints: ConstraintSet, H: Any, data: PromptSet, *, unsafe_only: bool = True,
                   min_count: int = 5, top_k: int = 5) -> FacetAnalysis:
    """Facet × category analysis of ``constraints`` on hidden states ``H`` [N, d] of the prompts
    ``data`` (same order; categories from ``data.categories``).

    Args:
        unsafe_only: analyse only unsafe rows (label 1) — the harm categories; False: every row.
        min_count: categories with fewer analysed rows are left out (noted) — too few to rate.
        top_k: prompts listed per facet, largest violation first.

    Example:
        >>> import torch, safeflow as sf
        >>> from safeflow.analysis import analyze_facets
        >>> poly = sf.ConstraintSet.create("polytope", input_dim=2, num_facets=2, num_features=2)
        >>> with torch.no_grad():
        ...     _ = poly.feature_map.weight.copy_(torch.eye(2)); _ = poly.feature_map.bias.zero_()
        ...     _ = poly.facets.copy_(torch.eye(2)); _ = poly.thresholds.fill_(1.0); _ = poly.fitted.fill_(True)
        >>> H = torch.tensor([[3.0, 0], [2.5, 0], [0, 3.0], [0, 2.0]])
        >>> data = sf.PromptSet(["a", "b", "c", "d"], [1, 1, 1, 1], ["fraud", "fraud", "violence", "violence"])
        >>> analyze_facets(poly, H, data, min_count=1).matching
        [(0, 'fraud', 1.0), (1, 'violence', 1.0)]
    """
    if len(data) == 0:
        raise DataError("no prompts to analyse; pass the prompts whose hidden states H holds")
    V = constraints.violations(constraints._check(H)).double().cpu().numpy()
    if len(V) != len(data):
        raise DataError(f"H has {len(V)} rows but the prompt set has {len(data)}; pass the hidden states of "
                        "exactly these prompts, in order")
    notes: list[str] = []
    rows = [i for i in range(len(data)) if not unsafe_only or data.labels[i] == 1]
    if not rows:
        raise DataError("no unsafe (label 1) prompts to analyse; pass unsafe prompts or unsafe_only=False")
    cats = [data.categories[i].strip() for i in rows]
    counted = Counter(c for c in cats if c)
    missing = sum(1 for c in cats if not c)
    if missing:
        notes.append(f"{missing} of {len(rows)} prompts have no category and are left out of the category tables")
    rare = sorted(c for c, n in counted.items() if n < min_count)
    if rare:
        notes.append(f"{len(rare)} categor{'y' if len(rare) == 1 else 'ies'} with fewer than {min_count} prompts left out "
                     f"(e.g. {', '.join(rare[:3])})")
    categories = sorted(c for c, n in counted.items() if n >= min_count)
    if not categories:
        notes.append("no categories to analyse: the category analysis is skipped (give prompts a 'category' column)")
        log.warning("facet analysis: %s", notes[-1])

    Vr = V[rows]
    fires = Vr > 0
    K = V.shape[1]
    onehot = np.array([[c == cat for cat in categories] for c in cats], dtype=bool).reshape(len(rows), len(categories))
    counts = onehot.T.astype(np.int64) @ fires.astype(np.int64)  # [C, K]
    totals = onehot.sum(0).astype(int).tolist()
    rates = counts / np.maximum(np.array(totals), 1)[:, None]
    labelled = onehot.any(1)
    dead = np.flatnonzero(~fires.any(0)).tolist()
    if dead:
        notes.append(f"{len(dead)} of {K} facets never fire on these prompts ({', '.join(map(str, dead[:20]))}); "
                     "they are not matched")
    mi = binary_mutual_information(fires[labelled], onehot[labelled]) if categories else np.zeros((K, 0))
    matching = match_facets(mi, categories) if categories else []
    top = {}
    for k in range(K):
        order = np.argsort(-Vr[:, k], kind="stable")[:top_k]
        top[k] = [{"text": data.texts[rows[i]], "category": cats[i], "violation": float(Vr[i, k])} for i in order]
    return FacetAnalysis(categories=categories, totals=totals, counts=counts, rates=rates,
                         fire_rate=fires.mean(0), mutual_information=mi, matching=matching,
                         normal_cosine=facet_normal_cosine(constraints), jaccard=jaccard(fires), top_prompts=top,
                         num_rows=len(rows), notes=notes)
