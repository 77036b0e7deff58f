"""The contract every registered constraint family and steerer keeps, checked for all of them —
including the throw-away pair of ``extension_toys.py``, which this module registers by importing
it and then drives through the command line and the report: the proof that a new family or
steerer is one file, with no edit of safeflow.

Per family: save/load round trip (bit-equal violations), the sign convention on separable data
(unsafe iff some violation > 0), a transactional fit that names unknown options. Per steerer:
rows it moves end inside or are reported as not inside (the reported violations are the true
ones), rows it leaves are untouched; under generation, the same tokens with and without KV cache
and batched or one prompt at a time, and prompts it does not steer answer exactly as unsteered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import extension_toys  # noqa: F401  (registers "toy-ball" and "toy-toward-mean")
import safeflow as sf
from safeflow.cli import main
from safeflow.decoding import generate_responses
from safeflow.errors import ConfigError
from safeflow.io import json_text, write_text_atomic
from safeflow.recipes import build_steerer
from safeflow.report import steering_rows, write_report

from conftest import ARCHITECTURES, make_model, make_tokenizer, save_model_dir, separable
from test_steering import LAYER, PROMPTS, chat, polytope_over

FAMILIES = sf.ConstraintSet.available()
STEERERS = sf.Steerer.available()
#: Small shapes so that the tests run in seconds (a family without an entry gets its defaults).
SMALL = {"polytope": {"num_facets": 4, "num_features": 64}, "mlp": {"hidden_sizes": [16]}}
#: Training settings for that small data (a family without an entry gets its defaults).
FIT = {"polytope": {"margin": 1.0, "feature_l1": 0.01}}
#: Settings for steering 4-prompt polytopes (a steerer without an entry gets its defaults): these
#: polytopes have a covariance of rank ~3, so covariance metrics cannot reach their inside.
STEER = {"safeflow": {"lambda_unsafe": 4.0, "lambda_safe": 0.5, "margin": 0.5, "lr": 0.1},
         "projection": {"metric": "euclidean", "margin": 0.5}}


def test_the_toys_are_registered_by_their_import_alone():
    assert {"toy-ball"} <= set(FAMILIES) and {"toy-toward-mean"} <= set(STEERERS)
    assert {"toy-ball", "toy-toward-mean"} <= set(sf.available()["constraint"] + sf.available()["steerer"])


def test_the_toys_read_their_own_preset_settings_declared_in_their_file(toy_data):
    """The toys' settings for ``qwen2-1.5b`` (declared in ``extension_toys.py``) reach them through
    ``Steerer.create(name, preset=...)``, ``from_preset`` and the family's fit options; a preset
    without them leaves the class defaults; explicit options win."""
    p = sf.presets.preset("qwen2-1.5b")
    assert p.settings["toy-toward-mean"] == extension_toys.TowardSettings(steps=3)
    assert sf.Steerer.create("toy-toward-mean", preset="qwen2-1.5b").steps == 3
    assert sf.Steerer.create("toy-toward-mean", preset=p).steps == 3
    assert extension_toys.TowardSafeMean.from_preset("qwen2-1.5b", steps=5).steps == 5
    assert sf.Steerer.create("toy-toward-mean", preset="default").steps == 8  # no settings there: the class default
    assert sf.Steerer.create("toy-toward-mean").steps == 8
    data = sf.SteeringData(harmful=toy_data[0], harmless=toy_data[0], responses=toy_data[0], response_labels=toy_data[1],
                           preset="qwen2-1.5b")
    assert extension_toys.TowardSafeMean.build(data).steps == 3  # how the demo and the attack protocol build it
    assert build_steerer("toy-toward-mean", "qwen2-1.5b").steps == 3  # how `safeflow generate --preset` builds it
    assert build_steerer("toy-toward-mean", "qwen2-1.5b", {"steps": 5}).steps == 5
    with pytest.raises(ConfigError, match="takes no option 'stride'"):
        sf.Steerer.create("toy-toward-mean", preset="qwen2-1.5b", stride=2)

    ball = sf.ConstraintSet.implementation("toy-ball")
    assert ball.reads_preset() and ball.fit_options_from_preset("qwen2-1.5b") == {"quantile": 0.75}
    assert ball.fit_options_from_preset("default") == {} and ball.config_from_preset("qwen2-1.5b") == {}
    H, y = toy_data[0], toy_data[1]
    fit = ball.from_preset(p, H.shape[1]).fit(H, y, progress=False, **ball.fit_options_from_preset(p))
    assert fit.provenance["training"]["options"] == {"quantile": 0.75}


def fitted(name: str, H: torch.Tensor, y: torch.Tensor) -> sf.ConstraintSet:
    cls = sf.ConstraintSet.implementation(name)
    options = {**({"epochs": 40} if "epochs" in cls.fit_defaults() else {}), **FIT.get(name, {})}
    return cls.from_preset("default", H.shape[1], **SMALL.get(name, {})).fit(H, y, progress=False, **options)


@pytest.fixture(scope="module")
def toy_data():
    H, y = separable(240, 8, gap=8.0)
    return H[:160], y[:160], H[160:], y[160:]


@pytest.fixture(scope="module")
def families(toy_data):
    H, y, _, _ = toy_data
    return {name: fitted(name, H, y) for name in FAMILIES}


# --- constraint families -------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_family_save_load_round_trip_is_bit_equal(name, families, toy_data, tmp_path):
    c, H_test = families[name], toy_data[2]
    c.save(tmp_path / "c.safetensors")
    back = sf.ConstraintSet.load(tmp_path / "c.safetensors")
    assert type(back) is type(c) and back.config() == c.config() and back.provenance == c.provenance
    assert torch.equal(back.violations(H_test), c.violations(H_test))
    for buffer in ("input_covariance", "safe_depth", "class_means"):
        assert torch.equal(getattr(back, buffer), getattr(c, buffer))


@pytest.mark.parametrize("name", FAMILIES)
def test_family_flags_unsafe_rows_by_a_positive_violation(name, families, toy_data):
    c, (_, _, H_test, y_test) = families[name], toy_data
    V = c.violations(H_test)
    assert V.shape == (len(H_test), c.num_constraints)
    assert torch.equal(c.predict(H_test), (V.max(dim=1).values > 0).long())  # unsafe iff any v_k > 0
    assert (c.predict(H_test) == y_test).float().mean() >= 0.9  # label 1 = unsafe
    assert float(c.safe_depth) >= 0 and c.provenance["training"]["constraint"] == name


@pytest.mark.parametrize("name", FAMILIES)
def test_family_fit_is_transactional_and_names_unknown_options(name, families, toy_data):
    c, H = families[name], toy_data[2]
    before = c.violations(H)
    with pytest.raises(ConfigError, match=f"unknown fit option 'bogus' for the '{name}' constraint set; valid: "):
        c.fit(toy_data[0], toy_data[1], bogus=1)
    with pytest.raises(ConfigError, match="takes no option 'bogus'"):
        type(c).from_preset("default", 8, bogus=1)
    assert torch.equal(c.violations(H), before)
    assert set(type(c).fit_defaults()) <= set(type(c).option_rules()) | set(type(c).fit_defaults())


# --- steerers -------------------------------------------------------------------------------
def built(name: str, H: torch.Tensor, y: torch.Tensor) -> sf.Steerer:
    data = sf.SteeringData(harmful=H[y == 1], harmless=H[y == 0], responses=H, response_labels=y, preset="default")
    return sf.Steerer.implementation(name).build(data, **STEER.get(name, {}))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", STEERERS)
def test_steered_rows_end_inside_or_are_reported(name, family, families, toy_data):
    c, (H, y, H_test, _) = families[family], toy_data
    s = built(name, H, y)
    r = s.steer(H_test, c)
    outside = c.violations(H_test).max(dim=1).values > 0
    with torch.no_grad():  # what is reported is what was written (up to the batch's rounding)
        torch.testing.assert_close(r.violations_after, c.violations(r.hidden), rtol=1e-5, atol=1e-5)
    assert torch.equal(r.inside, r.violations_after.max(dim=1).values <= 0)
    chosen = s.select(r.violations_before) & ~r.nonfinite
    assert torch.equal(r.hidden[~chosen], H_test[~chosen])  # rows not selected: untouched, bit for bit
    assert not (r.steered & ~chosen).any() and torch.equal(r.steered | r.rejected, chosen)
    if not s.unconditional:
        assert torch.equal(chosen, outside)
    assert r.shift[~r.steered].eq(0).all()


@pytest.fixture(scope="module")
def generation_setups(tokenizer):
    """Per architecture: a tiny model, a polytope over the 4 prompts (rows 0, 2 outside) and
    the prompts' states (for the steerers that fit themselves)."""
    setups = {}
    for arch in ARCHITECTURES:
        model = make_model(arch)
        H = sf.HFExtractor(model, tokenizer, layer=LAYER, progress=False).extract(PROMPTS)
        setups[arch] = (model, polytope_over(model, tokenizer, PROMPTS, [1, 0, 1, 0]), H)
    return setups


def gen(model, tok, prompts, **kw):
    return generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=kw.pop("batch_size", 8), **kw)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", STEERERS)
def test_steered_generation_is_the_same_with_and_without_cache_and_batched_or_alone(name, arch, tokenizer,
                                                                                   generation_setups):
    model, poly, H = generation_setups[arch]
    y = torch.tensor([1, 0, 1, 0])
    steerer = built(name, H.repeat(5, 1), y.repeat(5))
    # an unconditional steerer moves every row it is given: the polytope gates it as a detector
    steer = sf.SteeringSpec(constraints=poly, steerer=steerer, layer=LAYER, check_provenance=False,
                            gate=poly if steerer.unconditional else "prompt")
    _, plain_ids, _ = gen(model, tokenizer, PROMPTS)
    _, ids, log = gen(model, tokenizer, PROMPTS, steer=steer)
    assert log is not None and log.steered_rows() == [0, 2]  # the prompts outside the polytope
    s = log.summary()
    assert s["ended_inside"] == sum(e.inside for e in log.steered()) <= s["tokens_steered"]
    assert all(e.inside == (e.violation_after <= 0) for e in log.steered())
    with steer.apply(model):
        enc = tokenizer(chat(tokenizer, PROMPTS), return_tensors="pt", padding=True, add_special_tokens=False)
        cached = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    _, alone, _ = gen(model, tokenizer, PROMPTS, steer=steer, batch_size=1)
    assert alone == ids
    assert ids[1] == plain_ids[1] and ids[3] == plain_ids[3]  # prompts inside: exactly the unsteered answer


# --- the proof: the toys through the command line and the report ------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = make_tokenizer()
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "model", "llama", tok)


def test_toy_family_and_steerer_through_train_generate_and_the_report(tiny_dir, tmp_path, capsys):
    data = tmp_path / "prompts.csv"
    data.write_text("text,label\n" + "".join(f"{p},{lab}\n" for p, lab in zip(PROMPTS * 3, [1, 0, 1, 0] * 3)))
    common = ["--model", tiny_dir, "--layer", str(LAYER)]
    assert main(["extract", *common, "--data", str(data), "--out", str(tmp_path / "f.safetensors")]) == 0
    assert main(["train", "--features", str(tmp_path / "f.safetensors"), "--constraint", "toy-ball",
                 "--fit-opt", "quantile=1.0", "--out", str(tmp_path / "ball.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "trained toy-ball on 12 rows" in out and "quantile=1.0" in out
    ball = sf.ConstraintSet.load(tmp_path / "ball.safetensors")
    assert type(ball) is extension_toys.BallConstraint
    # the toy reads presets (its settings_type), so the run records the one it used (no entry matches: "default")
    assert ball.provenance["training"]["options"] == {"quantile": 1.0} and ball.provenance["training"]["preset"] == "default"
    assert ball.provenance["layer"] == LAYER
    # a bad value or an unknown option of the toy is refused with the toy's own rule / options
    assert main(["train", "--features", str(tmp_path / "f.safetensors"), "--constraint", "toy-ball",
                 "--fit-opt", "quantile=2", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "fit option quantile=2 is invalid: it must be a number in (0, 1]" in capsys.readouterr().err
    assert main(["train", "--features", str(tmp_path / "f.safetensors"), "--constraint", "toy-ball",
                 "--margin", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "unknown fit option 'margin' for the 'toy-ball' constraint set; valid: quantile" in capsys.readouterr().err

    argv = ["generate", *PROMPTS[:2], *common, "--constraints", str(tmp_path / "ball.safetensors"),
            "--steerer", "toy-toward-mean", "--steerer-opt", "steps=4", "--gate", "token", "--max-new-tokens", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--- steered" in out and '"checks"' in out
    assert main(argv[:-6] + ["--steerer", "toy-toward-mean", "--steerer-opt", "stride=4"]) == 2
    assert "the steerer 'toy-toward-mean' takes no option 'stride'; valid: steps" in capsys.readouterr().err

    # the report: the toy steerer's row in the steering table, steering into the toy family
    model, tok = sf.load_model(tiny_dir)
    result = sf.evaluate_steering(model, tok, ball, sf.Steerer.create("toy-toward-mean", steps=4), LAYER,
                                  harmful=PROMPTS[::2], benign=PROMPTS[1::2], edgy=PROMPTS[1:2], gate="token",
                                  max_new_tokens=3)
    steering = {"toy-toward-mean": result.to_json(records=False) | {"gate": "token"}}
    rows = steering_rows(steering)
    assert [r["steerer"] for r in rows] == ["unsteered", "toy-toward-mean"]
    run = tmp_path / "run"
    run.mkdir()
    metrics = {"model": "tiny", "layer": LAYER, "steering": steering, "detection": [], "config": {}}
    write_text_atomic(run / "metrics.json", json_text(metrics, indent=2))
    _, md, _ = write_report(run)
    table = [line for line in md.read_text().splitlines() if line.startswith("| toy-toward-mean |")]
    assert len(table) == 1 and "| token |" in table[0]


def _demo_prompts(tmp_path) -> Path:
    """A small prompt file for the demo on a tiny model: 20 harmful and 20 benign prompts."""
    data = tmp_path / "prompts.csv"
    ends = ("please", "now", "help", "me")
    rows = [(f"{a} {b}", 1) for a in ("make a bomb", "steal car", "hack bank", "kill someone", "sell drug") for b in ends]
    rows += [(f"{a} {b}", 0) for a in ("bake cookies", "cook pasta", "write poem", "plan trip", "explain rain") for b in ends]
    data.write_text("text,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return data


def test_toy_steerer_through_the_demo(tiny_dir, tmp_path, capsys, monkeypatch):
    """``safeflow demo --steerers toy-toward-mean`` on a tiny model and a small prompt file: the
    demo builds the toy (with its --steerer-opt) and the report's steering table has its row."""
    data = _demo_prompts(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", "--model", tiny_dir, "--data", str(data), "--out", str(out), "--layer", str(LAYER),
                 "--limit", "2", "--max-new-tokens", "3", "--features-width", "32", "--refusal-prompts", "4",
                 "--refusal-features-width", "32", "--capability-limit", "0", "--steerers", "toy-toward-mean@token",
                 "--steerer-opt", "toy-toward-mean.steps=2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["steering"]) == ["toy-toward-mean@token"] and metrics["steering"]["toy-toward-mean@token"]["gate"] == "token"
    assert metrics["config"]["steerer_options"] == {"toy-toward-mean": {"steps": 2}}
    md = (out / "report.md").read_text()
    assert any(line.startswith("| toy-toward-mean") for line in md.splitlines())


def test_toy_family_as_a_demo_detector(tiny_dir, tmp_path):
    """``safeflow demo --detectors toy-ball polytope``: any registered family is trained, saved,
    tabled and drawn as a detector; the facet analysis runs on the first family that offers it."""
    data = _demo_prompts(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", "--model", tiny_dir, "--data", str(data), "--out", str(out), "--layer", str(LAYER),
                 "--limit", "2", "--max-new-tokens", "3", "--features-width", "32", "--refusal-prompts", "4",
                 "--refusal-features-width", "32", "--capability-limit", "0", "--steerers", "toy-toward-mean@token",
                 "--detectors", "toy-ball", "polytope"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(dict.fromkeys(r["model"] for r in metrics["detection"])) == ["toy-ball", "polytope"]
    assert metrics["config"]["detectors"] == ["toy-ball", "polytope"] and metrics["facets"]["model"] == "polytope"
    assert sf.ConstraintSet.load(out / "toy-ball.safetensors").provenance["layer"] == LAYER
    assert (out / "polytope.safetensors").is_file() and not (out / "mlp.safetensors").exists()
    md = (out / "report.md").read_text()
    assert any(line.startswith("| toy-ball | val_ood |") for line in md.splitlines())
    assert "The `polytope` detector on" in md and (out / "figures" / "violations.png").is_file()
    assert main(["demo", "--out", str(out), "--detectors", "no-such-family"]) == 2


def test_plugins_named_in_the_environment_are_imported_before_parsing(monkeypatch, capsys):
    from safeflow.cli import load_plugins

    monkeypatch.setenv("SAFEFLOW_PLUGINS", " extension_toys ,")
    assert load_plugins() == ["extension_toys"]
    monkeypatch.setenv("SAFEFLOW_PLUGINS", "extension_toys,no_such_plugin_module")
    assert main(["train", "--constraint", "toy-ball"]) == 2
    assert "cannot import 'no_such_plugin_module' named in $SAFEFLOW_PLUGINS" in capsys.readouterr().err
