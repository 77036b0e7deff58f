"""Facet interpretability on planted data: categories planted on facets are recovered."""

from __future__ import annotations

import doctest
import logging

import numpy as np
import pytest
import torch

import safeflow as sf
from safeflow import analysis
from safeflow.analysis import analyze_facets, binary_mutual_information, jaccard

CATS = ["violence", "fraud", "cyber"]


def planted_polytope(d: int = 6, K: int = 3) -> sf.PolytopeConstraints:
    """f(h) = [ReLU(h), ReLU(-h)] (F = 2d); facet k: v_k = ReLU(h_k) - 1."""
    poly = sf.ConstraintSet.create("polytope", input_dim=d, num_facets=K, num_features=2 * d, backend="torch")
    with torch.no_grad():
        poly.feature_map.weight.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
        poly.feature_map.bias.zero_()
        poly.facets.zero_()
        for k in range(K):
            poly.facets[k, k] = 1.0
        poly.thresholds.fill_(1.0)
        poly.fitted.fill_(True)
    return poly


def planted_data(n_per: int = 20, d: int = 6, seed: int = 0, plant=(2, 0, 1)):
    """Category CATS[j] pushes coordinate plant[j] to ~3 (facet plant[j] fires); safe rows near 0."""
    g = torch.Generator().manual_seed(seed)
    H, texts, labels, cats = [], [], [], []
    for j, cat in enumerate(CATS):
        h = 0.2 * torch.randn(n_per, d, generator=g)
        h[:, plant[j]] += 3.0
        H.append(h)
        texts += [f"{cat} prompt {i}" for i in range(n_per)]
        labels += [1] * n_per
        cats += [cat] * n_per
    H.append(0.2 * torch.randn(n_per, d, generator=g))
    texts += [f"safe {i}" for i in range(n_per)]
    labels += [0] * n_per
    cats += ["cooking"] * n_per
    return torch.cat(H), sf.PromptSet(texts, labels, cats)


def test_hand_built_polytope_recovers_planted_facets():
    H, data = planted_data()
    res = analyze_facets(planted_polytope(), H, data, top_k=3)
    assert res.categories == sorted(CATS)
    assert dict((c, k) for k, c, _ in res.matching) == {"violence": 2, "fraud": 0, "cyber": 1}
    # each category fires exactly its planted facet
    planted = {"violence": 2, "fraud": 0, "cyber": 1}
    for c, cat in enumerate(res.categories):
        expected = np.zeros(3)
        expected[planted[cat]] = 1.0
        np.testing.assert_allclose(res.rates[c], expected)
        assert res.totals[c] == 20
    # perfect indicator of a 1/3 category: MI = H(1/3) bits
    h = -(1 / 3) * np.log2(1 / 3) - (2 / 3) * np.log2(2 / 3)
    for _, _, mi in res.matching:
        assert mi == pytest.approx(h, abs=1e-9)
    assert res.num_rows == 60  # safe rows left out (unsafe_only)
    np.testing.assert_allclose(res.jaccard, np.eye(3))  # disjoint facets
    np.testing.assert_allclose(res.normal_cosine, np.eye(3), atol=1e-12)
    assert [p["category"] for p in res.top_prompts[0]] == ["fraud"] * 3
    assert res.top_prompts[0][0]["violation"] >= res.top_prompts[0][-1]["violation"]
    out = res.to_dict()
    assert out["matching"][0] == {"facet": 0, "category": "fraud", "mi_bits": pytest.approx(h, abs=1e-6)}


def test_fitted_polytope_tables_match_its_violations():
    """On a trained polytope the tables are the violations' own counts (training need not make
    facets specialise, so only consistency is checked here; the plant test checks recovery)."""
    H, data = planted_data(n_per=30, d=8, plant=(0, 3, 6))
    poly = sf.ConstraintSet.create("polytope", input_dim=8, num_facets=4, num_features=32, backend="torch")
    poly.fit(H, data.y, margin=1.0, epochs=20, progress=False)
    res = analyze_facets(poly, H, data, unsafe_only=False, min_count=1)
    fires = (poly.violations(H) > 0).detach().numpy()
    for c, cat in enumerate(res.categories):
        rows = [i for i, x in enumerate(data.categories) if x == cat]
        np.testing.assert_array_equal(res.counts[c], fires[rows].sum(0))
    np.testing.assert_allclose(res.fire_rate, fires.mean(0))
    assert res.mutual_information.shape == (4, 4) and 1 <= len(res.matching) <= 4
    assert all(mi > 0 for _, _, mi in res.matching)


def test_mutual_information_against_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.random((200, 4)) < 0.4
    y = rng.random((200, 3)) < 0.3
    mi = binary_mutual_information(x, y)
    for k in range(4):
        for c in range(3):
            total = 0.0
            for a in (0, 1):
                for b in (0, 1):
                    pab = np.mean((x[:, k] == a) & (y[:, c] == b))
                    if pab > 0:
                        total += pab * np.log2(pab / (np.mean(x[:, k] == a) * np.mean(y[:, c] == b)))
            assert mi[k, c] == pytest.approx(total, abs=1e-12)
    assert jaccard(np.array([[1, 1], [1, 0], [0, 0]], bool))[0, 1] == pytest.approx(0.5)


def test_no_categories_is_skipped_with_a_note(caplog):
    H, data = planted_data()
    data.categories = [""] * len(data)
    with caplog.at_level(logging.WARNING):
        res = analyze_facets(planted_polytope(), H, data)
    assert res.categories == [] and res.matching == [] and res.counts.shape == (0, 3)
    assert any("skipped" in n for n in res.notes) and "skipped" in caplog.text
    assert res.fire_rate.shape == (3,) and len(res.top_prompts[1]) == 5


def test_rare_and_missing_categories_are_noted():
    H, data = planted_data()
    data.categories[0] = ""
    data.categories[1] = "one-off"
    res = analyze_facets(planted_polytope(), H, data)
    assert "one-off" not in res.categories
    assert any("no category" in n for n in res.notes) and any("fewer than 5" in n for n in res.notes)


def test_bad_input():
    H, data = planted_data()
    with pytest.raises(sf.DataError, match="rows but the prompt set"):
        analyze_facets(planted_polytope(), H[:10], data)
    with pytest.raises(sf.DataError, match="no unsafe"):
        analyze_facets(planted_polytope(), H[-20:], data.subset(range(60, 80)))
    with pytest.raises(sf.DataError, match="hidden size"):
        analyze_facets(planted_polytope(), H[:, :3], data)


def test_docstring_examples():
    assert doctest.testmod(analysis, raise_on_error=True).attempted > 0


def test_facets_that_never_fire_are_noted_and_not_matched():
    H, data = planted_data()
    poly = planted_polytope(K=4)  # facet 3 reads coordinate 3, which no category pushes
    res = analyze_facets(poly, H, data)
    assert [k for k, _, _ in res.matching] == [0, 1, 2]
    assert any("1 of 4 facets never fire" in n for n in res.notes)
