import math

import pytest
import torch

import safeflow as sf
from safeflow.constraints import assign_facets
from safeflow.constraints.training import entropy_bits
from safeflow.errors import CorruptFileError, DataError

from conftest import separable

KINDS = {"polytope": dict(num_facets=4, num_features=256), "mlp": dict(hidden_sizes=[32]), "linear": {}}


def fitted(kind, H, y, epochs=40):
    opts = dict(margin=1.0, feature_l1=0.01) if kind == "polytope" else {}
    return sf.ConstraintSet.create(kind, input_dim=H.shape[1], **KINDS[kind]).fit(H, y, progress=False, epochs=epochs, **opts)


@pytest.mark.parametrize("kind", list(KINDS))
def test_separable_data_is_learned(kind):
    H, y = separable(400, 16, seed=1, gap=6.0)
    Ht, yt = separable(200, 16, seed=2, gap=6.0)
    model = fitted(kind, H, y)
    m = sf.detection_metrics(yt, model.score(Ht))
    assert m["f1"] > 0.95 and m["auroc"] > 0.98, m
    assert torch.equal(model.predict(Ht), (model.violations(Ht).max(1).values > 0).long())


def test_polytope_violations_match_float64_reference():
    H, y = separable(128, 12)
    poly = fitted("polytope", H, y)
    W, b = poly.feature_map.weight.double(), poly.feature_map.bias.double()
    ref = torch.relu(H.double() @ W.T + b) @ poly.facets.double().T - poly.thresholds.double()
    torch.testing.assert_close(poly.violations(H).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_closed_form_vjp_matches_autograd(kind):
    H, y = separable(64, 12)
    model = fitted(kind, H, y)
    weights = lambda V: 0.5 + 2.0 * (V > 0).double()  # noqa: E731
    model = model.double()
    V, grad = model.violations_vjp(H.double(), weights)
    Hr = H.double().requires_grad_(True)
    Vr = model.violations(Hr)
    (ref,) = torch.autograd.grad((Vr * weights(Vr.detach())).sum(), Hr)
    torch.testing.assert_close(V, Vr.detach())
    torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip_is_bit_identical(kind, tmp_path):
    H, y = separable(64, 12)
    model = fitted(kind, H, y)
    path = tmp_path / f"{kind}.safetensors"
    model.save(path)
    loaded = sf.ConstraintSet.load(path)
    assert type(loaded) is type(model)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(model.violations(H), loaded.violations(H))


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    H, y = separable(64, 12)
    model = fitted("linear", H, y)
    path = tmp_path / "c.safetensors"
    model.save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safeflow.io.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle", "wrong_shape"])
def test_damaged_or_hostile_files_give_clear_errors(damage, tmp_path):
    H, y = separable(64, 12)
    model = fitted("linear", H, y)
    path = tmp_path / "c.safetensors"
    model.save(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 200)
    elif damage == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"a": 1}))
    else:
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        t["net.0.weight"] = torch.zeros(1, 5)
        save_file(t, str(path), metadata=meta)
    with pytest.raises(CorruptFileError, match="re-create it"):
        sf.ConstraintSet.load(path)


def test_bad_inputs_are_named():
    poly = sf.PolytopeConstraints(8, 2, 16)
    H, y = separable(32, 8)
    with pytest.raises(DataError, match="hidden size 5"):
        poly.fit(torch.randn(32, 5), y)
    with pytest.raises(DataError, match="only class"):
        poly.fit(H, torch.ones(32))
    with pytest.raises(DataError, match=r"found \[2\]"):
        poly.fit(H, torch.full((32,), 2))
    with pytest.raises(DataError, match="empty"):
        poly.fit(torch.empty(0, 8), torch.empty(0))
    bad = H.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN/inf"):
        poly.fit(bad, y)
    with pytest.raises(DataError, match="not been fitted"):
        poly.predict(H)
    poly.fit(H, y, progress=False, epochs=2)
    with pytest.raises(DataError, match="expects 8"):
        poly.predict(torch.randn(3, 9))


def test_assignment_spreads_unsafe_rows_over_facets():
    K = 8
    v = torch.zeros(64, K)
    v[:, 0] = 1.0  # everybody prefers facet 0
    v[:, 1:] = torch.rand(64, K - 1) * 0.5
    a = assign_facets(v, entropy_weight=1.0)
    counts = torch.bincount(a, minlength=K)
    assert entropy_bits(counts) >= 0.5 * math.log2(K)
    assert torch.equal(assign_facets(v, entropy_weight=0.0), torch.zeros(64, dtype=torch.long))


def test_assignment_moves_the_cheapest_row():
    v = torch.tensor([[1.0, 0.9], [1.0, -5.0], [1.0, -5.0], [1.0, -5.0]])
    a = assign_facets(v, entropy_weight=2.0)  # target 1 bit -> 2/2 split
    assert a.tolist().count(1) == 2 and a[0] == 1


@pytest.mark.parametrize("rule", ["greedy", "reference"])
def test_assignment_moves_rows_only_to_facets_they_violate(rule):
    """A row may move to a facet it violates, or to its second-most-violated one; never elsewhere."""
    K = 6
    v = torch.full((40, K), -1.0)
    v[:, 0] = 2.0  # everybody violates facet 0 most
    v[:20, 3] = 1.0  # half also violate facet 3
    v[20:, 5] = -0.5  # the other half violate nothing else; facet 5 is their second
    a = assign_facets(v, 1.0, rule, torch.Generator().manual_seed(0))
    assert set(a[:20].tolist()) <= {0, 3} and set(a[20:].tolist()) <= {0, 5}
    assert entropy_bits(torch.bincount(a, minlength=K)) > 0.5  # some rows moved


def test_reference_assignment_only_raises_entropy_and_is_seeded():
    K = 8
    v = torch.rand(64, K, generator=torch.Generator().manual_seed(3))
    v[:, 0] += 1.0
    start = entropy_bits(torch.bincount(v.argmax(1), minlength=K))
    a = assign_facets(v, 1.0, "reference", torch.Generator().manual_seed(1))
    assert entropy_bits(torch.bincount(a, minlength=K)) > start
    assert torch.equal(a, assign_facets(v, 1.0, "reference", torch.Generator().manual_seed(1)))


def test_standardisation_is_folded_into_raw_space():
    H, y = separable(200, 10, gap=5.0)
    H = H * 100 + 1000  # badly scaled raw states
    model = fitted("linear", H, y, epochs=200)
    assert sf.detection_metrics(y, model.score(H))["f1"] > 0.95


@pytest.mark.parametrize("kind", list(KINDS))
def test_local_affine_reproduces_violations_and_jacobian(kind):
    """v(h) = A h − c at h itself, and A is the float64 autograd Jacobian (the polytope's closed form too)."""
    torch.manual_seed(0)
    model = sf.ConstraintSet.create(kind, input_dim=6, **KINDS[kind]).double()
    model.fitted.fill_(True)  # random parameters stand in for trained ones (violations refuse an unfitted set)
    H = torch.randn(5, 6, dtype=torch.float64)
    A, c = model.local_affine(H)
    assert A.shape == (5, model.num_constraints, 6) and c.shape == (5, model.num_constraints)
    torch.testing.assert_close(torch.einsum("nkd,nd->nk", A, H) - c, model.violations(H))
    J = torch.stack([torch.autograd.functional.jacobian(lambda h: model.violations(h[None])[0], h) for h in H])
    torch.testing.assert_close(A, J)
