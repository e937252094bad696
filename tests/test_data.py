import pytest

from tickettune.data import DataError, load_labels, load_train, load_val, taxonomy
from conftest import SAMPLE, write_jsonl

GOOD = {"id": "a", "ticket": "t", "intent": "x.y", "ideal_reply": "r"}


def test_sample_data_is_consistent():
    train, val, labels = load_train(SAMPLE / "train.jsonl"), load_val(SAMPLE / "val.jsonl"), load_labels(SAMPLE / "val_labels.jsonl")
    assert len(train) == 30 and len(val) == 50
    assert 10 <= len(taxonomy(train)) <= 15
    assert [v.id for v in val] == [lab.id for lab in labels]
    assert {lab.intent for lab in labels} <= set(taxonomy(train))
    assert sum(lab.probe for lab in labels) >= 12


@pytest.mark.parametrize("line, problem", [
    ('{"id": "a", "ticket": "t", "intent": "x"', "malformed JSON"),
    ('{"id": "a", "intent": "x", "ideal_reply": "r"}', "missing field 'ticket'"),
    ('{"id": "a", "ticket": 5, "intent": "x", "ideal_reply": "r"}', "field 'ticket' must be str, got int"),
    ('{"id": null, "ticket": "t", "intent": "x", "ideal_reply": "r"}', "field 'id' must be str or int, got null"),
    ('{"id": "a", "ticket": "t", "intent": "  ", "ideal_reply": "r"}', "field 'intent' is empty"),
    ('[1, 2]', "expected a JSON object, got list"),
])
def test_train_problems_name_file_line_and_field(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD | {"id": "first"}, line])
    with pytest.raises(DataError) as err:
        load_train(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert problem in str(err.value)


def test_all_problems_of_a_file_are_reported_at_once(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", ['{"id": "a"}', "not json", {"id": "a", "ticket": "x"}, {"id": "a", "ticket": "y"}])
    with pytest.raises(DataError) as err:
        load_val(path)
    assert [p.split(": ", 1)[0] for p in err.value.problems] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert "duplicated id 'a' (first seen on line 3)" in err.value.problems[-1]


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_bytes(b'{"id": "a", "ticket": "ok"}\n{"id": "b", "ticket": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"val.jsonl:2: not valid UTF-8"):
        load_val(path)


def test_blank_lines_and_extra_fields_are_ignored(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", ["", {"id": 7, "ticket": "x", "extra": [1]}, "   "])
    assert [(t.id, t.ticket) for t in load_val(path)] == [(7, "x")]


def test_empty_val_file_is_valid_and_empty_train_is_not(tmp_path):
    assert load_val(write_jsonl(tmp_path / "val.jsonl", [])) == []
    with pytest.raises(DataError, match="no training rows"):
        load_train(write_jsonl(tmp_path / "train.jsonl", []))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read file"):
        load_val(tmp_path / "nope.jsonl")
