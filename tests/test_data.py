import pytest

from tickettune.pipeline.data import DataError, load_labels, load_tickets, load_train, load_val, taxonomy
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


def test_csv_tickets_take_the_id_column_or_number_the_rows(tmp_path):
    with_ids = tmp_path / "a.csv"
    with_ids.write_text('id,ticket,channel\nT-9,"Where is my invoice, please?",email\nT-3,"two\nlines",chat\n')
    assert [(t.id, t.ticket) for t in load_tickets(with_ids)] == [("T-9", "Where is my invoice, please?"),
                                                                 ("T-3", "two\nlines")]
    no_ids = tmp_path / "b.csv"
    no_ids.write_text("body\nfirst\n\nsecond\n")  # a blank line is not a row
    assert [(t.id, t.ticket) for t in load_tickets(no_ids, text_column="body")] == [("row_1", "first"),
                                                                                   ("row_2", "second")]


def test_jsonl_is_recognised_by_content_and_reads_like_val(tmp_path):
    path = write_jsonl(tmp_path / "tickets.txt", [{"id": 1, "ticket": "a"}, {"id": "b", "ticket": "c"}])
    assert load_tickets(path) == load_val(path)


@pytest.mark.parametrize("content, problems", [
    ("text\nhello\n", [":1: no 'ticket' column (header: text); name the ticket column with --text-column"]),
    ("id,ticket\na,x\na,y\n", [":3: duplicated id 'a' (first seen on line 2)"]),
    ("id,ticket\n,x\nb,y,z\n", [":2: field 'id' is empty", ":3: 3 cells, the header has 2"]),
    ("id,ticket\nb\n", [":2: missing field 'ticket' (fewer cells than the header)"]),
])
def test_csv_problems_name_file_and_line_all_at_once(tmp_path, content, problems):
    path = tmp_path / "in.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_tickets(path)
    assert err.value.problems == [f"{path}{p}" for p in problems]


def test_csv_with_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b"ticket\nok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"in.csv:3: not valid UTF-8"):
        load_tickets(path)
