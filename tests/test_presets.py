"""Model presets split per component: every value of every preset as it was before the split
(pinned from the flat ``ModelPreset`` of that version), what each component reads from them, the
fallback to class defaults, the deprecated flat reads and the registration rules."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

import safeflow as sf
from safeflow.constraints import PolytopeConstraints, PolytopeSettings
from safeflow.errors import ConfigError
from safeflow.presets import PRESETS, RELATIVE_DEFAULT, ModelPreset, PresetConfigured, preset, register_settings
from safeflow.steerers import LineSettings, ProjectionSettings, SafeFlowSettings

#: ``ModelPreset.to_dict()`` of every preset before the split (and the relative default), printed
#: from that version: the values below must stay bit for bit (floats compare exactly).
BEFORE = {
    "llama-2-7b": {"layer": 20, "margin": 60.0, "feature_l1": 0.0078125, "facet_l1": 7.8125e-07, "unsafe_weight": 2.0,
                   "num_facets": 50, "num_features": 16384, "lambda_unsafe": 4.0, "lambda_safe": 0.0001,
                   "steer_depth": 0.0, "line_depth": 3.0, "steerer": "safeflow", "precondition": "none",
                   "schedule": "constant", "average": 0.0},
    "ministral-8b": {"layer": 20, "margin": 5.0, "feature_l1": 0.0078125, "facet_l1": 7.8125e-07, "unsafe_weight": 3.0,
                     "num_facets": 30, "num_features": 16384, "lambda_unsafe": 0.25, "lambda_safe": 0.0,
                     "steer_depth": 0.0, "line_depth": 3.0, "steerer": "safeflow", "precondition": "none",
                     "schedule": "constant", "average": 0.0},
    "qwen2-1.5b": {"layer": 20, "margin": 30.0, "feature_l1": 0.0078125, "facet_l1": 7.8125e-07, "unsafe_weight": 5.0,
                   "num_facets": 50, "num_features": 16384, "lambda_unsafe": 10.0, "lambda_safe": 5000.0,
                   "steer_depth": 0.0, "line_depth": 3.0, "steerer": "safeflow", "precondition": "none",
                   "schedule": "constant", "average": 0.0},
    "smollm2-135m-instruct": {"layer": 20, "margin": 20.0, "feature_l1": 0.01, "facet_l1": 0.001, "unsafe_weight": 3.0,
                              "num_facets": 14, "num_features": 4096, "lambda_unsafe": 4.0, "lambda_safe": 0.0,
                              "steer_depth": 3.0, "line_depth": 3.0, "steerer": "line", "precondition": "covariance",
                              "schedule": "cosine", "average": 0.5},
}
BEFORE["default"] = {**BEFORE["smollm2-135m-instruct"], "layer": None}
NAMES = list(BEFORE)
FIT_KEYS = ("margin", "feature_l1", "facet_l1", "unsafe_weight", "schedule", "average")  # the old fit_options()


def same(a, b) -> bool:
    """Equal and of the same type (so 3 and 3.0, or 0.0 and -0.0 as hex, are told apart)."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex()
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", NAMES)
def test_every_value_is_as_before_the_split(name):
    old, p = BEFORE[name], preset(name)
    poly, flow = p.settings["polytope"], p.settings["safeflow"]
    new = {"layer": p.layer, "steerer": p.steerer, **dataclasses.asdict(poly),
           "lambda_unsafe": flow.lambda_unsafe, "lambda_safe": flow.lambda_safe, "steer_depth": flow.depth,
           "precondition": flow.precondition, "line_depth": p.settings["line"].depth}
    assert set(new) == set(old)
    assert all(same(new[k], old[k]) for k in old), {k: (new[k], old[k]) for k in old if not same(new[k], old[k])}
    assert type(poly) is PolytopeSettings and type(flow) is SafeFlowSettings


@pytest.mark.parametrize("name", NAMES)
def test_what_each_component_reads_is_as_before(name):
    old = BEFORE[name]
    assert PolytopeConstraints.config_from_preset(name) == {"num_facets": old["num_facets"],
                                                           "num_features": old["num_features"]}
    options = PolytopeConstraints.fit_options_from_preset(name)
    assert list(options) == list(FIT_KEYS) and all(same(options[k], old[k]) for k in FIT_KEYS)
    poly = PolytopeConstraints.from_preset(name, 8)
    assert (poly.num_constraints, poly.num_features) == (old["num_facets"], old["num_features"])

    flow = sf.SafeFlowSteerer(preset=name)
    assert [flow.lambda_unsafe, flow.lambda_safe, flow.depth, flow.precondition, flow.margin] == [
        old["lambda_unsafe"], old["lambda_safe"], old["steer_depth"], old["precondition"], None]
    assert same(flow.lambda_safe, old["lambda_safe"]) and same(flow.depth, old["steer_depth"])
    line = sf.Steerer.create("line", preset=name)
    assert same(line.depth, old["line_depth"]) and line.margin is None
    # the projection read SafeFlow's settings before: precondition="covariance" as its metric, steer_depth as its depth
    proj = sf.ProjectionSteerer(preset=name, solver="native")
    metric = "covariance" if old["precondition"] == "covariance" else "euclidean"
    assert (proj.metric, proj.margin) == (metric, None) and same(proj.depth, old["steer_depth"])
    assert preset(name).settings["projection"] == ProjectionSettings(metric=metric, depth=old["steer_depth"])


@pytest.mark.parametrize("name", NAMES)
def test_the_flat_reads_still_work_with_a_warning_naming_the_new_place(name):
    p, old = preset(name), BEFORE[name]
    for key, value in old.items():
        if key in ("layer", "steerer"):
            assert same(getattr(p, key), value)
            continue
        with pytest.warns(DeprecationWarning, match=rf"ModelPreset\.{key} is deprecated; read preset\.settings\["):
            assert same(getattr(p, key), value)
    with pytest.warns(DeprecationWarning, match="fit_options_from_preset"):
        assert p.fit_options() == PolytopeConstraints.fit_options_from_preset(p)


def test_the_relative_default_shares_the_default_models_settings():
    assert RELATIVE_DEFAULT.settings is PRESETS["smollm2-135m-instruct"].settings
    assert preset("default") is RELATIVE_DEFAULT and preset(None) is RELATIVE_DEFAULT and preset() is RELATIVE_DEFAULT
    assert (RELATIVE_DEFAULT.layer, RELATIVE_DEFAULT.steerer) == (None, "line")


def test_a_preset_pickles_and_copies():
    """A preset (whose settings are a live read-only view) pickles and deep-copies. Only the
    built-in components' settings: a component defined where pickle cannot import it (a docs
    example run by test_docs registers one) cannot be pickled, whatever the preset does."""
    p = preset("qwen2-1.5b")
    p = ModelPreset(p.layer, p.steerer, {k: v for k, v in p.settings.items()
                                         if type(v).__module__.startswith("safeflow.")})
    assert {"polytope", "safeflow", "projection", "line"} <= set(p.settings)
    assert pickle.loads(pickle.dumps(p)) == p and copy.deepcopy(p) == p


def test_to_dict_is_json_with_each_components_settings():
    d = preset("llama-2-7b").to_dict()
    assert json.loads(json.dumps(d)) == d and (d["layer"], d["steerer"]) == (20, "safeflow")
    assert d["settings"]["polytope"]["margin"] == 60.0 and d["settings"]["safeflow"]["lambda_safe"] == 1e-4


def test_a_preset_without_a_components_settings_gives_its_class_defaults():
    bare = ModelPreset(layer=3, steerer="safeflow")
    assert PolytopeConstraints.config_from_preset(bare) == {} and PolytopeConstraints.fit_options_from_preset(bare) == {}
    poly = PolytopeConstraints.from_preset(bare, 8)
    assert (poly.num_constraints, poly.num_features) == (14, 16384)  # the constructor's defaults
    flow, line = sf.SafeFlowSteerer(preset=bare), sf.LineSteerer(preset=bare)
    defaults = SafeFlowSettings()
    assert (flow.lambda_unsafe, flow.lambda_safe, flow.depth, flow.precondition) == (
        defaults.lambda_unsafe, defaults.lambda_safe, defaults.depth, defaults.precondition)
    assert line.depth == LineSettings().depth
    proj = sf.ProjectionSteerer(preset=bare, solver="native")
    assert (proj.metric, proj.depth) == (ProjectionSettings().metric, ProjectionSettings().depth)
    with pytest.raises(AttributeError, match="no settings for 'polytope'"), pytest.warns(DeprecationWarning):
        bare.margin  # noqa: B018  (a deprecated read of settings this preset lacks)


def test_a_users_preset_carries_its_own_settings_and_explicit_arguments_win():
    mine = ModelPreset(layer=5, steerer="safeflow", settings={
        "polytope": dataclasses.replace(preset("default").settings["polytope"], num_facets=3),
        "safeflow": SafeFlowSettings(lambda_unsafe=2.0, depth=1.0)})
    assert PolytopeConstraints.from_preset(mine, 8).num_constraints == 3
    assert PolytopeConstraints.from_preset(mine, 8, num_facets=2).num_constraints == 2
    flow = sf.Steerer.create("safeflow", preset=mine, lambda_unsafe=7.0)
    assert (flow.lambda_unsafe, flow.depth) == (7.0, 1.0)
    with pytest.raises(TypeError):
        mine.settings["line"] = LineSettings()  # read-only
    with pytest.raises(ConfigError, match="not the SafeFlowSettings"):
        sf.SafeFlowSteerer(preset=ModelPreset(layer=1, settings={"safeflow": LineSettings()}))
    with pytest.raises(ConfigError, match="must be a dataclass instance"):
        ModelPreset(layer=1, settings={"safeflow": {"depth": 1.0}})


def test_registration_refuses_unknown_presets_conflicts_and_unnamed_classes():
    with pytest.raises(ConfigError, match="unknown preset 'gpt-5'"):
        register_settings("polytope", {"gpt-5": preset("default").settings["polytope"]})
    with pytest.raises(ConfigError, match="already holds settings for 'polytope'"):
        register_settings("polytope", {"llama-2-7b": preset("default").settings["polytope"]})
    register_settings("polytope", {"llama-2-7b": preset("llama-2-7b").settings["polytope"]})  # the same again: a no-op
    with pytest.raises(ConfigError, match="not registered under a name"):
        class Unnamed(PresetConfigured):  # noqa: F841
            preset_settings = {"llama-2-7b": LineSettings()}
    with pytest.raises(ConfigError, match=r"Stray.settings_type has fields \['depth'\] that .* does not take"):
        class Stray(PolytopeConstraints):  # noqa: F841
            settings_type = LineSettings
    with pytest.raises(ConfigError, match=r"has fields \['metric'\] that .* does not take; valid: depth, margin"):
        class StraySteerer(sf.LineSteerer):  # noqa: F841
            settings_type = ProjectionSettings
