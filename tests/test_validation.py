"""Bad settings and bad data fail up front with a clear error, never with an untrained model
marked fitted: fit options, labels, hidden states, dtypes, steerer settings, metrics."""

import math

import pytest
import torch

import safeflow as sf
from safeflow.errors import ConfigError, DataError
from safeflow.evaluation import detection_metrics

from conftest import separable

KINDS = {"polytope": dict(num_facets=3, num_features=64), "mlp": dict(hidden_sizes=[16]), "linear": {}}


def make(kind, d=8):
    return sf.ConstraintSet.create(kind, input_dim=d, **KINDS[kind])


def fit(model, H, y, **kw):
    opts = dict(margin=1.0, feature_l1=0.01) if isinstance(model, sf.PolytopeConstraints) else {}
    return model.fit(H, y, progress=False, **{"epochs": 20, **opts, **kw})


# --- fit settings ------------------------------------------------------------------------
COMMON_BAD = [("epochs", -1), ("epochs", 0), ("epochs", 2.5), ("epochs", True), ("batch_size", -1),
              ("batch_size", 0), ("lr", 0), ("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")), ("lr", 1e38),
              ("seed", -1)]
POLYTOPE_BAD = [("margin", float("nan")), ("margin", float("inf")), ("margin", 1e38), ("margin", -1.0),
                ("unsafe_weight", -1.0), ("feature_l1", float("nan")), ("facet_l1", -1e-3), ("entropy_weight", "1"),
                ("schedule", "linear"), ("average", 1.0), ("average", -0.1), ("assignment", "random"), ("init", None)]


@pytest.mark.parametrize("kind,option,value", [(k, *bad) for k in KINDS
                                                 for bad in COMMON_BAD + (POLYTOPE_BAD if k == "polytope" else [])])
def test_bad_fit_settings_are_refused_before_training(kind, option, value):
    H, y = separable(64, 8)
    model = make(kind)
    with pytest.raises(ConfigError, match=f"{option}="):
        model.fit(H, y, progress=False, **{option: value})
    assert not bool(model.fitted)


def test_refit_interrupted_during_training_leaves_the_fitted_set_as_it_was(monkeypatch):
    H, y = separable(64, 8)
    model = fit(make("polytope"), H, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert bool(model.fitted)
    with pytest.raises(ConfigError):  # refused up front: nothing changed, still fitted
        model.fit(H, y, progress=False, average=2.0)
    assert bool(model.fitted)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safeflow.constraints.polytope.train_minibatches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.fit(H, y, progress=False)
    assert bool(model.fitted)  # fit trains a copy: the interrupted copy is dropped, the set is untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_training_that_diverges_is_not_marked_fitted():
    H, y = separable(64, 8)
    linear = sf.LinearConstraint(8)
    with torch.no_grad():
        linear.net[0].weight[0, 3] = float("nan")  # what a diverged training procedure leaves behind
    with pytest.raises(ConfigError, match=r"NaN/inf in \['net.0.weight'\]; lower lr"):
        linear._record_fit(sf.FeatureDataset.from_tensors(H, y), torch.cov(H.T.double()))
    assert not bool(linear.fitted)


@pytest.mark.parametrize("kind", list(KINDS))
def test_hidden_states_that_require_grad_are_detached(kind):
    H, y = separable(128, 8, gap=6.0)
    layer = torch.nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(8))
        layer.bias.zero_()
    Hg = layer(H)  # straight from a forward pass: part of an autograd graph
    assert Hg.requires_grad
    model = fit(make(kind), Hg, y, epochs=5)
    reference = fit(make(kind), H, y, epochs=5)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert torch.equal(model.score(Hg), reference.score(H))


@pytest.mark.parametrize("labels", [["safe", "unsafe"] * 32, [None] * 64, [object()] * 64, [0.5, 1.0] * 32,
                                    [float("nan"), 1.0] * 32])
def test_labels_that_are_not_numbers_0_or_1_are_data_errors(labels):
    H, _ = separable(64, 8)
    with pytest.raises(DataError, match="labels must be"):
        make("polytope").fit(H, labels, progress=False, epochs=1)


@pytest.mark.parametrize("kind,kwargs", [("polytope", dict(num_facets=True)), ("polytope", dict(num_features=2.0)),
                                         ("polytope", dict(input_dim=True)), ("mlp", dict(hidden_sizes=[True])),
                                         ("mlp", dict(hidden_sizes=16))])
def test_bool_or_float_sizes_are_config_errors(kind, kwargs):
    with pytest.raises(ConfigError, match="must be"):
        sf.ConstraintSet.create(kind, **{"input_dim": 8, **kwargs})


@pytest.mark.parametrize("H", [torch.full((4, 8), 1e30), "abc", [[1, 2], [3]], torch.randn(4, 8, dtype=torch.cfloat)])
def test_unusable_hidden_states_are_data_errors(H):
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(DataError):
        make("polytope").fit(H, y, progress=False, epochs=1)


def test_huge_hidden_states_are_named_not_fitted_to_chance():
    H, y = separable(64, 8)
    H[5] *= 1e30
    with pytest.raises(DataError, match=r"beyond ±1e\+15 in 1 row\(s\) \(first: \[5\]"):
        make("linear").fit(H, y, progress=False)


# --- dtypes --------------------------------------------------------------------------------
def test_float64_constraint_set_steers_in_float64():
    H, y = separable(200, 8, gap=6.0)
    poly = fit(make("polytope"), H, y, epochs=40)
    rows = H[y == 1][:4]
    steerer = sf.SafeFlowSteerer(lambda_unsafe=4.0, lr=0.05, margin=0.0)
    single = steerer.steer(rows, poly)
    double = steerer.steer(rows.double(), poly.double())
    assert double.violations_after.dtype == torch.float64 and double.hidden.dtype == torch.float64
    assert torch.equal(single.steered, double.steered) and double.inside.all()
    torch.testing.assert_close(double.hidden.float(), single.hidden, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(double.violations_after, poly.violations(double.hidden))
    assert double.hidden.dtype == torch.float64 and steerer.steer(rows, poly).hidden.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_constraint_set_scores_but_steering_and_fit_ask_for_float(dtype, tokenizer):
    H, y = separable(64, 8)
    poly = fit(make("polytope"), H, y).to(dtype)
    assert poly.predict(H).shape == (64,)
    with pytest.raises(ConfigError, match=r"call .float\(\)"):
        sf.SafeFlowSteerer().steer(H[:2], poly)
    with pytest.raises(ConfigError, match=r"call .float\(\)"):
        poly.fit(H, y, progress=False)
    with pytest.raises(ConfigError, match=r"call .float\(\)"):
        poly.double().fit(H, y, progress=False)
    from conftest import make_model

    model = make_model("llama")
    big = fit(make("polytope", 32), torch.randn(64, 32), y).to(dtype)
    with pytest.raises(ConfigError, match=r"call .float\(\)"):
        with sf.steering(model, big, sf.SafeFlowSteerer(), layer=1):
            pass


# --- steerer settings --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(lr=float("nan")), dict(lr=0), dict(lr=-1.0), dict(lambda_unsafe=float("nan")),
                                    dict(lambda_unsafe=-1.0), dict(lambda_unsafe=float("inf")),
                                    dict(lambda_safe=float("nan")), dict(margin=float("nan")), dict(margin=-1.0),
                                    dict(margin=float("inf")), dict(max_steps=0), dict(max_steps=2.5),
                                    dict(max_steps=True), dict(lr="0.1")])
def test_safeflow_settings_are_checked(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        sf.SafeFlowSteerer(**kwargs)


# --- metrics -------------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [[1, 2, 1, 0], [0, 1, -1, 1], [0.5, 1, 0, 1], ["1", "0", "1", "0"]])
def test_detection_metrics_refuse_labels_outside_0_1(labels):
    with pytest.raises(DataError, match="labels must be 0"):
        detection_metrics(labels, [0.1, 0.2, -0.3, 0.4])


def test_detection_metrics_refuse_nan_scores_naming_the_rows():
    with pytest.raises(DataError, match=r"NaN in 2 row\(s\) \(first: \[1, 3\]\)"):
        detection_metrics([1, 1, 0, 0], [0.5, float("nan"), -0.5, float("nan")])
    m = detection_metrics([1, 0], [float("inf"), float("-inf")])  # infinite scores still rank
    assert m["auroc"] == 1.0 and m["recall"] == 1.0
    assert math.isnan(detection_metrics([1, 1], [0.2, 0.3])["auroc"])  # one class: NaN in the API


def test_prompt_files_that_are_not_utf8_or_too_deep_are_data_errors(tmp_path):
    from safeflow.data import load_prompt_file

    latin = tmp_path / "p.csv"
    latin.write_bytes("text,label\ncaf\xe9 recipe,0\nsteal car,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_prompt_file(latin)
    deep = tmp_path / "p.jsonl"
    deep.write_text('{"text": "bake cookies", "label": 0}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2 is not valid JSON"):
        load_prompt_file(deep)
