"""Prompt files and splits: byte-order marks, JSON arrays, directories, non-string texts, repeated
and conflicting texts (warned about, never split across train and test)."""

import logging

import pytest

import safeflow as sf
from safeflow.data import load_prompt_file, source_split, split_indices, stratified_split


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\nbake cookies,0\nsteal car,1\n".encode("utf-8-sig"))
    data = load_prompt_file(path)
    assert data.texts == ["bake cookies", "steal car"] and data.labels == [0, 1]


def test_json_array_file_is_read_as_an_array(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[\n  {"text": "bake cookies", "label": 0},\n  {"text": "steal car", "label": "unsafe"}\n]\n')
    data = load_prompt_file(path)
    assert data.texts == ["bake cookies", "steal car"] and data.labels == [0, 1]
    jsonl = tmp_path / "lines.json"  # a .json file written as JSON lines still reads
    jsonl.write_text('{"text": "bake cookies", "label": 0}\n{"text": "steal car", "label": 1}\n')
    assert load_prompt_file(jsonl).labels == [0, 1]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "bake cookies", "label": 0},\n')
    with pytest.raises(sf.DataError, match="not a valid JSON array"):
        load_prompt_file(broken)


def test_directory_is_named_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        sf.load_prompts(str(tmp_path))


@pytest.mark.parametrize("value", ['{"a": 1}', '["steal", "car"]', "null", "true", "3"])
def test_jsonl_text_that_is_not_a_string_names_the_row(tmp_path, value):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "bake cookies", "label": 0}\n{"text": ' + value + ', "label": 1}\n')
    with pytest.raises(sf.DataError, match=r"p.jsonl row 2: 'text' holds a \w+ .*not a string"):
        load_prompt_file(path)


def test_repeated_and_conflicting_texts_are_warned_about(tmp_path, caplog):
    path = tmp_path / "p.csv"
    path.write_text("text,label\nsteal car,1\nsteal car,0\nbake cookies,0\nbake cookies,0\nbake cookies,0\n"
                    "hack bank,1\n")
    with caplog.at_level(logging.WARNING, logger="safeflow.data"):
        data = load_prompt_file(path)
    assert len(data) == 6  # kept: the warning says what to fix
    message = caplog.text
    assert "2 text(s) occur more than once (3 extra row(s)" in message
    assert "1 of them labelled both unsafe and safe (e.g. 'steal car')" in message
    caplog.clear()
    unique = tmp_path / "u.csv"
    unique.write_text("text,label\nsteal car,1\nbake cookies,0\n")
    with caplog.at_level(logging.WARNING, logger="safeflow.data"):
        load_prompt_file(unique)
    assert not caplog.records


def _with_repeats(n_texts=40, copies=3):
    texts, labels, sources = [], [], []
    for i in range(n_texts):
        for c in range(copies if i % 4 == 0 else 1):
            texts.append(f"prompt {i}")
            labels.append((i + c) % 2 if i % 8 == 0 else i % 2)  # every 8th text labelled both ways
            sources.append("a" if i < n_texts // 2 else "b")
    return sf.PromptSet(texts, labels, sources=sources)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.5])
def test_stratified_split_keeps_copies_of_a_text_on_one_side(seed, fraction):
    data = _with_repeats()
    train, test = split_indices(data, fraction, seed)
    assert sorted(train + test) == list(range(len(data)))
    assert not {data.texts[i] for i in train} & {data.texts[i] for i in test}
    tr, te = stratified_split(data, fraction, seed)
    assert not set(tr.texts) & set(te.texts)
    assert abs(len(te) - fraction * len(data)) <= 6  # about the fraction, whole texts at a time


def test_split_without_repeats_takes_exactly_the_fraction_per_group():
    data = sf.PromptSet([f"p{i}" for i in range(50)], [i % 2 for i in range(50)], sources=["s"] * 50)
    train, test = split_indices(data, 0.3, 1)
    assert len(test) == 2 * round(25 * 0.3)


def test_source_split_drops_training_copies_of_test_texts(caplog):
    data = sf.PromptSet(["steal car", "bake cookies", "steal car", "hack bank", "bake cookies"], [1, 0, 1, 1, 0],
                        sources=["train-src", "train-src", "held", "held", "train-src"])
    with caplog.at_level(logging.WARNING, logger="safeflow.data"):
        train, test = source_split(data, ["held"])
    assert test.texts == ["steal car", "hack bank"]
    assert train.texts == ["bake cookies", "bake cookies"]
    assert "1 training row(s) repeat a text of the test source(s) ['held']" in caplog.text
