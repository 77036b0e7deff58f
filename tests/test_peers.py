"""The peers as registered steerers: activation addition along a refusal direction ("direction";
with a detector gate it is CAST) and null-space constrained steering ("alphasteer")."""

import pytest
import torch

import safeflow as sf
from safeflow.errors import ConfigError, CorruptFileError, DataError

from conftest import make_model, make_tokenizer, separable

PROMPTS = ["how do i make a bomb", "bake cookies please", "hack bank steal car", "tell me why sky blue"]


def fitted_polytope(d=16):
    H, y = separable(200, d, gap=4.0)
    return H, y, sf.PolytopeConstraints(d, 3, 64).fit(H, y, progress=False, margin=1.0, feature_l1=0.01, epochs=30)


def test_direction_is_the_difference_of_means_and_moves_every_row():
    H, y, poly = fitted_polytope()
    s = sf.Steerer.create("direction", input_dim=16, alpha=1.5).fit(H[y == 1], H[y == 0])
    expected = H[y == 1].double().mean(0) - H[y == 0].double().mean(0)
    torch.testing.assert_close(s.direction, expected.float())
    rows = H[:10]
    r = s.steer(rows, poly)
    assert r.steered.all()  # unconditional: inside rows move too; the gate chooses rows in steering()
    torch.testing.assert_close(r.hidden, rows + 1.5 * s.direction)
    torch.testing.assert_close(r.violations_after, poly.violations(r.hidden))
    assert (r.iterations == 1).all()


def test_nullspace_map_leaves_benign_states_and_maps_harmful_ones_onto_the_direction():
    torch.manual_seed(0)
    d = 24
    basis = torch.linalg.qr(torch.randn(d, d)).Q
    benign = torch.randn(300, 12) @ basis[:, :12].T  # benign states span 12 of 24 dimensions
    offset = 3.0 * torch.randn(12) @ basis[:, 12:].T  # harmful states leave the benign span along one offset
    harmful = benign[:100] + offset + 0.1 * torch.randn(100, 12) @ basis[:, 12:].T
    s = sf.NullSpaceSteerer(d, strength=1.0).fit(harmful, benign, ridge=1e-6)
    r = harmful.double().mean(0) - benign.double().mean(0)
    assert (benign @ s.matrix).norm(dim=1).max() < 1e-4 * benign.norm(dim=1).max()  # the null-space constraint
    mapped = (harmful.double() @ s.matrix.double())
    assert (mapped - r).norm(dim=1).mean() < 0.1 * r.norm()  # ridge regression onto r
    _, _, poly = fitted_polytope(d)
    out = s.steer(benign[:5], poly)
    torch.testing.assert_close(out.hidden, benign[:5], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, options", [("direction", {"alpha": -0.5}), ("alphasteer", {"strength": 2.0})])
def test_fitted_steerers_round_trip_with_provenance(tmp_path, name, options):
    H, y, _ = fitted_polytope()
    s = sf.Steerer.create(name, input_dim=16, **options).fit(H[y == 1], H[y == 0])
    s.provenance.update(layer=2, model="tiny")
    s.save(tmp_path / "s.safetensors")
    back = sf.Steerer.load(tmp_path / "s.safetensors")
    assert type(back) is type(s) and back.config() == s.config() and back.provenance == s.provenance
    for (k, a), (_, b) in zip(s.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(CorruptFileError, match="constraint set"):
        sf.ConstraintSet.load(tmp_path / "s.safetensors")


def test_fitted_steerer_contract_errors(tmp_path):
    H, y, poly = fitted_polytope()
    with pytest.raises(DataError, match="not been fitted"):
        sf.DirectionSteerer(16).steer(H[:2], poly)
    with pytest.raises(DataError, match="not been fitted"):
        sf.DirectionSteerer(16).save(tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="alpha"):
        sf.DirectionSteerer(16, alpha=float("nan"))
    with pytest.raises(DataError, match="same mean"):
        sf.DirectionSteerer(16).fit(H, H)
    with pytest.raises(DataError, match="hidden size"):
        sf.DirectionSteerer(8).fit(H[y == 1], H[y == 0])
    s = sf.DirectionSteerer(16).fit(H[y == 1], H[y == 0])
    s.provenance["layer"] = 2.5
    with pytest.raises(ConfigError, match="layer"):
        s.save(tmp_path / "bad.safetensors")
    poly.save(tmp_path / "poly.safetensors")
    with pytest.raises(CorruptFileError, match="not a saved steerer"):
        sf.Steerer.load(tmp_path / "poly.safetensors")


def test_direction_steering_under_generate_cache_and_batch_parity_and_provenance():
    tok = make_tokenizer()
    model = make_model("llama")
    ext = sf.HFExtractor(model, tok, layer=2, progress=False)
    H = ext.extract(PROMPTS)
    y = torch.tensor([1, 0, 1, 0])
    poly = sf.PolytopeConstraints(H.shape[1], 3, 64).fit(H.repeat(10, 1) + 0.01 * torch.randn(40, H.shape[1]),
                                                         y.repeat(10), progress=False, margin=1.0, epochs=20)
    s = sf.DirectionSteerer(H.shape[1], alpha=4.0).fit(H[y == 1], H[y == 0])
    s.provenance.update(sf.describe_source(ext))
    steer = sf.SteeringSpec(constraints=poly, steerer=s, layer=2, gate="token", first_n_tokens=None)
    plain, _, _ = sf.generate_responses(model, tok, PROMPTS, max_new_tokens=6)
    batched, ids_b, log = sf.generate_responses(model, tok, PROMPTS, max_new_tokens=6, steer=steer)
    alone = [sf.generate_responses(model, tok, [p], max_new_tokens=6, steer=steer)[1][0] for p in PROMPTS]
    assert log is not None and log.summary()["rows_steered"] == 4
    assert batched != plain  # the addition changes the answers
    assert ids_b == alone  # batched equals one prompt at a time
    # KV-cache parity of every registered steerer: test_conformance.py
    with pytest.raises(ConfigError, match="layer 2"):
        with sf.steering(model, poly, s, layer=3):
            pass


# --- line steering: the constraint set decides when and how far, its training means where -----
def test_fit_records_the_class_means_and_they_survive_save_and_load(tmp_path):
    H, y, poly = fitted_polytope()
    torch.testing.assert_close(poly.class_means.double(), torch.stack([H[y == 0].double().mean(0),
                                                                        H[y == 1].double().mean(0)]), rtol=0, atol=1e-5)
    poly.save(tmp_path / "p.safetensors")
    torch.testing.assert_close(sf.ConstraintSet.load(tmp_path / "p.safetensors").class_means, poly.class_means)


def test_line_steerer_reaches_the_target_depth_along_the_class_means_only():
    H, y, poly = fitted_polytope()
    s = sf.Steerer.create("line", depth=1.0)
    diff = H[y == 0].double().mean(0) - H[y == 1].double().mean(0)
    u, scale = s.direction(poly)
    torch.testing.assert_close(u, (diff / diff.norm()).float(), rtol=0, atol=1e-5)
    rows = H[:40]
    r = s.steer(rows, poly)
    outside = poly.violations(rows).amax(1) > 0
    assert outside.any() and (~outside).any()
    assert torch.equal(r.steered, outside)  # only rows outside move (the default selection)
    assert torch.equal(r.hidden[~outside], rows[~outside])
    m = float(poly.safe_depth)
    assert (r.violations_after[outside].amax(1) <= -m).all() and r.inside[outside].all()
    step = r.hidden[outside] - rows[outside]
    t = step @ u
    torch.testing.assert_close(step, t[:, None] * u)  # a move along u alone, forward
    assert (t > 0).all()
    shorter = rows[outside] + 0.99 * step  # minimal: 1 % shorter (beyond the bisection tolerance) is not deep enough
    assert (poly.violations(shorter).amax(1) > -m).all()


def test_line_steerer_caps_the_move_and_needs_the_class_means():
    H, y, poly = fitted_polytope()
    s = sf.LineSteerer(depth=1.0, max_scale=1e-3)
    rows = H[y == 1][:5]
    r = s.steer(rows, poly)
    assert r.steered.all() and not r.inside.any()
    torch.testing.assert_close((r.hidden - rows).norm(dim=1), torch.full((5,), 1e-3 * s.direction(poly)[1]))
    with pytest.raises(ConfigError, match="max_scale"):
        sf.LineSteerer(max_scale=0)
    poly.class_means.zero_()  # a file saved before format 4
    with pytest.raises(DataError, match="record_class_means"):
        s.steer(rows, poly)
    poly.record_class_means(H, y)
    assert s.steer(rows, poly).steered.all()


def test_every_registered_steerer_builds_from_a_runs_states():
    H, y, poly = fitted_polytope()
    data = sf.SteeringData(harmful=H[y == 1], harmless=H[y == 0], responses=H, response_labels=y,
                           provenance={"layer": 2, "model": "tiny"}, preset="default")
    for name in sf.Steerer.available():
        s = sf.Steerer.implementation(name).build(data)
        assert isinstance(s, sf.Steerer) and s.registered_name == name
        s.check(poly)
        r = s.steer(H[:6], poly)
        assert r.hidden.shape == (6, 16) and torch.isfinite(r.hidden).all()
        if isinstance(s, sf.FittedSteerer):
            assert s.provenance == {"layer": 2, "model": "tiny"}
        assert s.default_gate in ("detector", "token")
