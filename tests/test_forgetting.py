"""tickettune forgetting: question loading, option encoding, accuracy and the paired CI (fast), and
the table in `tickettune eval --report`."""

import json
from argparse import Namespace

import numpy as np
import pytest

from conftest import write_jsonl
from tickettune.pipeline.data import DataError
from tickettune.tools.forgetting import (
    Question,
    accuracy,
    format_table,
    load_questions,
    paired_ci95,
    summarise,
    warnings_for,
)

ROW = {"centerpiece": "What melts ice?", "options": ["heat", "cold"], "correct_options_idx": [0]}


def test_questions_load_with_a_limit_and_every_problem_named(tmp_path):
    good = write_jsonl(tmp_path / "q.jsonl", [ROW, ROW | {"centerpiece": "second"}, ROW | {"centerpiece": "third"}])
    assert [q.text for q in load_questions(good, limit=2)] == ["What melts ice?", "second"]
    assert load_questions(good)[0] == Question("What melts ice?", ("heat", "cold"), 0)
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROW | {"options": ["only one"]}, ROW | {"correct_options_idx": [2]},
                                              {"centerpiece": "x", "options": ["a", "b"]}])
    with pytest.raises(DataError) as err:
        load_questions(bad)
    assert [p.split(": ", 1)[0] for p in err.value.problems] == [f"{bad}:3"]  # fields first, then values
    bad.write_text(json.dumps(ROW | {"options": ["only one"]}) + "\n" + json.dumps(ROW | {"correct_options_idx": [2]}) + "\n")
    with pytest.raises(DataError) as err:
        load_questions(bad)
    assert err.value.problems == [f"{bad}:1: field 'options' must be a list of >= 2 non-empty strings",
                                  f"{bad}:2: field 'correct_options_idx' must hold one index into 'options'"]


def test_accuracy_by_sum_and_by_length_disagree_where_they_should():
    questions = [Question("q", ("a", "a much longer answer"), 1), Question("q", ("yes", "no"), 0)]
    acc, norm = accuracy([np.array([-2.0, -6.0]), np.array([-1.0, -3.0])], questions)
    assert acc.tolist() == [0.0, 1.0] and norm.tolist() == [1.0, 1.0]  # -6/21 bytes beats -2/2 bytes


def test_paired_interval_and_the_warning():
    base = np.array([1.0] * 60 + [0.0] * 40)
    worse = base.copy()
    worse[:10] = 0.0  # loses 10 questions, gains none: a clear drop
    low, high = paired_ci95(worse, base)
    assert low < -0.1 < high < 0
    summary = summarise((base, base), {"intent": (worse, worse), "reply": (base, base)})
    assert summary["adapters"]["intent"]["delta_acc"] == -0.1 and summary["adapters"]["reply"]["ci95"] == [0.0, 0.0]
    assert len(warnings_for(summary)) == 1 and "intent adapter lost 0.100" in warnings_for(summary)[0]
    assert "| + intent adapter | 0.500 | 0.500 | -0.100" in format_table(summary)


def test_eval_shows_the_forgetting_table_in_the_report_and_the_text(tmp_path, capsys):
    from tickettune.tools.grade import main

    base = np.array([1.0, 0.0, 1.0, 1.0])
    summary = summarise((base, base), {"intent": (base, base)})
    (tmp_path / "f.json").write_text(json.dumps(summary))
    write_jsonl(tmp_path / "labels.jsonl", [{"id": "v1", "intent": "a", "ideal_reply": "Hello there."}])
    (tmp_path / "results.json").write_text(json.dumps({
        "training": {"steps": 1, "train_loss": 1.0, "val_loss": 1.0, "wall_clock_s": 10},
        "predictions": [{"id": "v1", "prediction": "Hello there.", "predicted_intent": "a", "latency_ms": 1,
                         "tokens_used": 1}]}))
    args = Namespace(results=str(tmp_path / "results.json"), labels=str(tmp_path / "labels.jsonl"), synonyms=None,
                     json=False, judge_model="gpt-4o-mini", budget_usd=3.0, judge_cache=str(tmp_path / "c"),
                     offline=True, report=str(tmp_path / "report"), weights=None, forgetting=str(tmp_path / "f.json"))
    assert main(args) == 0
    assert "| + intent adapter | 0.750 | 0.750 | +0.000" in capsys.readouterr().out
    page = (tmp_path / "report" / "index.html").read_text()
    assert "General ability (forgetting check)" in page and "+ intent adapter" in page
    (tmp_path / "f.json").write_text('{"base": {}}')
    assert main(args) == 2
