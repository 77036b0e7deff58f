import pytest

import safeflow as sf
from safeflow.errors import ConfigError


def own(base) -> list[str]:
    """The names safeflow itself registers (tests register throw-away ones too: extension_toys.py)."""
    return [n for n in base.available() if base.implementation(n).__module__.startswith("safeflow.")]


def test_available_lists_every_registry():
    reg = sf.available()
    assert set(reg) == {"extractor", "constraint", "steerer", "attack", "kernel"}
    assert reg["extractor"] == ["hf"]
    assert own(sf.ConstraintSet) == ["linear", "mlp", "polytope"]
    assert own(sf.Steerer) == ["alphasteer", "cast", "direction", "line", "projection", "safeflow"]
    assert reg["attack"] == ["adaptive-gcg", "direct", "gcg", "template"]
    assert {"auto", "torch"} <= set(reg["kernel"]) <= {"auto", "cpu", "cuda", "torch"}


@pytest.mark.parametrize("base", [sf.Extractor, sf.ConstraintSet, sf.Steerer, sf.Attack])
def test_unknown_name_lists_valid_ones(base):
    with pytest.raises(ConfigError) as err:
        base.create("nope")
    for name in base.available():
        assert repr(name) in str(err.value)


def test_create_builds_registered_class():
    poly = sf.ConstraintSet.create("polytope", input_dim=8, num_facets=3, num_features=16)
    assert isinstance(poly, sf.PolytopeConstraints) and poly.facets.shape == (3, 16)
    steerer = sf.Steerer.create("safeflow")
    assert isinstance(steerer, sf.SafeFlowSteerer) and steerer.max_steps == 100


def test_duplicate_registration_is_refused():
    with pytest.raises(ConfigError, match="already registered"):
        class Other(sf.ConstraintSet, name="polytope"):  # noqa: F841
            pass
