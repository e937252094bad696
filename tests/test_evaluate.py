"""The published scoring rules, one table per rule; pure functions only (milliseconds)."""

from __future__ import annotations

import json
import math
from argparse import Namespace

import pytest

from tickettune.pipeline.data import DataError, Label
from tickettune.tools.evaluate import (
    composite,
    efficiency,
    forbidden_found,
    format_table,
    intent_correct,
    load_synonyms,
    mentions,
    normalise_intent,
    normalise_synonyms,
    row_reply_score,
    score,
)
from tickettune.tools.grade import main
from tickettune.tools.results_file import parse_results, read_results

TRAINING = {"steps": 10, "train_loss": 1.0, "val_loss": 1.2, "wall_clock_s": 300.0}


def pred(id, intent="a.x", reply="hello", **extra) -> dict:
    return {"id": id, "prediction": reply, "predicted_intent": intent, "latency_ms": 5, "tokens_used": 7, **extra}


def label(id, intent="a.x", must=(), must_not=(), probe=False) -> Label:
    return Label(id, intent, f"ideal {id}", tuple(must), tuple(must_not), probe)


def results(*preds, training=TRAINING) -> dict:
    return {"training": dict(training), "predictions": list(preds)}


# --- intent ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("billing.refund", "billing.refund"),
    ("  Billing.Refund\n", "billing.refund"),
    ("BILLING.REFUND", "billing.refund"),
    ("billing  refund\tx", "billing refund x"),
    ("", ""),
])
def test_normalise_intent(raw, expected):
    assert normalise_intent(raw) == expected


SYN = normalise_synonyms({"Billing.Refund": ["refund", "billing.money_back "]})


@pytest.mark.parametrize("predicted, gold, ok", [
    ("billing.refund", "billing.refund", True),
    (" BILLING.refund ", "billing.refund", True),  # case + whitespace
    ("refund", "billing.refund", True),  # synonym
    ("Billing.Money_Back", "billing.refund", True),  # synonym, normalised both sides
    ("billing.refunds", "billing.refund", False),  # near miss is wrong
    ("billing.refund", "refund", False),  # synonyms are one-way: label -> alternatives
    ("refund", "account.reset", False),  # a synonym only counts for its own gold label
    (None, "billing.refund", False),  # missing prediction is wrong
    ("", "billing.refund", False),
])
def test_intent_correct(predicted, gold, ok):
    assert intent_correct(predicted, gold, SYN) is ok


def test_intent_and_probe_accuracy_are_separate():
    labels = [label(1, "a"), label(2, "b"), label(3, "c"), label(4, "a", probe=True), label(5, "b", probe=True)]
    parsed = parse_results(results(pred(1, "a"), pred(2, "B "), pred(3, "x"), pred(4, "a"), pred(5, "a")),
                           [l.id for l in labels])
    ev = score(labels, parsed)
    assert ev.intent_accuracy == pytest.approx(2 / 3)
    assert ev.probe_accuracy == pytest.approx(1 / 2)


def test_synonyms_used_by_score():
    labels = [label(1, "billing.refund"), label(2, "billing.refund")]
    parsed = parse_results(results(pred(1, "Refund"), pred(2, "money back")), [1, 2])
    assert score(labels, parsed).intent_accuracy == 0.0
    assert score(labels, parsed, synonyms={"billing.refund": ["refund"]}).intent_accuracy == 0.5


def test_missing_prediction_is_wrong_everywhere():
    labels = [label(1, must=["hello"], must_not=["bye"]), label(2, must=["hello"], must_not=["bye"])]
    parsed = parse_results(results(pred(1)), [1, 2])
    ev = score(labels, parsed, judge_scores=[1.0, 0.9])
    assert "missing prediction for id 2" in ev.problems
    assert ev.intent_accuracy == 0.5
    assert ev.must_mention_rate == 0.5
    assert ev.must_not_mention_rate == 0.5  # a missing reply fails must_not too
    missing = ev.rows[1]
    assert (missing.missing, missing.judge, missing.reply_score) == (True, 0.0, 0.0)
    assert ev.reply_similarity == 0.5


def test_duplicate_id_scores_first_occurrence():
    parsed = parse_results(results(pred(1, "a.x"), pred(1, "b.y")), [1])
    assert parsed.predictions[1]["predicted_intent"] == "a.x"
    assert any("duplicated id" in p for p in parsed.problems)
    assert score([label(1, "a.x")], parsed).intent_accuracy == 1.0
    # and the other way round: a wrong first occurrence is not rescued by a right duplicate
    parsed = parse_results(results(pred(1, "b.y"), pred(1, "a.x")), [1])
    assert score([label(1, "a.x")], parsed).intent_accuracy == 0.0


# --- schema problems ------------------------------------------------------------------------------

@pytest.mark.parametrize("obj, expected", [
    ([], "expected a JSON object"),
    ({"predictions": []}, "missing 'training'"),
    ({"training": [], "predictions": []}, "'training' must be an object"),
    ({"training": TRAINING}, "missing 'predictions'"),
    ({"training": TRAINING, "predictions": {}}, "'predictions' must be a list"),
    (results(training={k: v for k, v in TRAINING.items() if k != "val_loss"}), "missing field 'val_loss'"),
    (results(training={**TRAINING, "wall_clock_s": "300"}), "'wall_clock_s' must be a finite number"),
    (results(training={**TRAINING, "train_loss": None}), "'train_loss' must be a finite number"),
    (results(training={**TRAINING, "train_loss": float("nan")}), "'train_loss' must be a finite number"),
    (results(training={**TRAINING, "val_loss": True}), "'val_loss' must be a finite number"),
    (results(training={**TRAINING, "steps": 10.5}), "'steps' must be an integer"),
    (results(training={**TRAINING, "wall_clock_s": -1}), "'wall_clock_s' is negative"),
    (results("row"), "predictions[0]: expected an object"),
    (results({"prediction": "x"}), "predictions[0]: missing field 'id'"),
    (results(pred(None)), "field 'id' must be a non-empty string or integer"),
    (results(pred(True)), "field 'id' must be a non-empty string or integer"),
    (results(pred(1.0)), "field 'id' must be a non-empty string or integer"),
    (results(pred("")), "field 'id' must be a non-empty string or integer"),
    (results(pred(1), pred(1)), "predictions[1] (id 1): duplicated id"),
    (results(pred(1), pred(99)), "predictions[1] (id 99): unknown id"),
    (results(pred("1")), "predictions[0] (id '1'): unknown id"),  # "1" is not 1
    (results(), "missing prediction for id 1"),
    (results({"id": 1, "predicted_intent": "a", "latency_ms": 1, "tokens_used": 1}), "missing field 'prediction'"),
    (results(pred(1, reply=None)), "field 'prediction' must be a string"),
    (results(pred(1, intent=3)), "field 'predicted_intent' must be a string"),
    (results(pred(1, latency_ms="5")), "field 'latency_ms' must be a number"),
    (results(pred(1, latency_ms=float("inf"))), "field 'latency_ms' must be a number"),
    (results(pred(1, tokens_used=7.5)), "field 'tokens_used' must be an integer"),
    (results(pred(1, tokens_used=False)), "field 'tokens_used' must be an integer"),
])
def test_schema_problems(obj, expected):
    problems = parse_results(obj, [1]).problems
    assert any(expected in p for p in problems), problems


def test_clean_results_have_no_problems():
    assert parse_results(results(pred(1), pred("b")), [1, "b"]).problems == []


def test_every_problem_is_reported_at_once():
    obj = {"training": {"steps": "x"}, "predictions": [pred(1, reply=3), pred(1), pred(7)]}
    problems = parse_results(obj, [1, 2]).problems
    assert len(problems) == 3 + 1 + 1 + 1 + 1 + 1  # 3 training missing + steps + reply + dup + unknown + missing


def test_wrong_typed_reply_scores_like_missing_reply():
    parsed = parse_results(results(pred(1, reply=None)), [1])
    ev = score([label(1, must=["hi"])], parsed, judge_scores=[0.8])
    assert (ev.rows[0].reply, ev.rows[0].must_mention_ok, ev.rows[0].must_not_ok, ev.rows[0].judge) == \
        (None, False, False, 0.0)
    assert ev.intent_accuracy == 1.0  # the intent itself was fine


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_read_results_bad_files(tmp_path, content, expected):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    obj, problems = read_results(path)
    assert obj is None and expected in problems[0]
    obj, problems = read_results(tmp_path / "absent.json")
    assert obj is None and "cannot read file" in problems[0]


# --- must / must-not ------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, entries, missed", [
    ("Go to Settings > Billing.", ["settings > billing"], []),  # case-insensitive substring
    ("Go to SETTINGS", ["settings|profile"], []),  # any alternative
    ("Go to profile", ["settings|profile"], []),
    ("Go to the page", ["settings|profile"], ["settings|profile"]),
    ("50 free guests, 16 USD", ["50 free guests|50 guests", "$16"], ["$16"]),  # every entry must match
    ("anything", [], []),
    ("anything", ["|"], []),  # an entry with only empty alternatives is ignored
    ("a b", ["x| b "], []),  # alternatives are stripped
    ("", ["hi"], ["hi"]),
    ("Straße", ["STRASSE"], ["STRASSE"]),  # str.lower, not casefold
])
def test_mentions(reply, entries, missed):
    assert mentions(reply, entries) == missed


@pytest.mark.parametrize("reply, entries, found", [
    ("We refund within 24 hours", ["24 hours"], ["24 hours"]),
    ("We refund within 24 HOURS", ["24 hours"], ["24 hours"]),
    ("within 14 days", ["30 days|30-day", "24 hours"], []),
    ("a 30-day window", ["30 days|30-day"], ["30-day"]),
    ("anything", [], []),
    ("", ["x"], []),
])
def test_forbidden_found(reply, entries, found):
    assert forbidden_found(reply, entries) == found


def test_mention_rates_and_exclusion_of_rows_without_entries():
    labels = [
        label(1, must=["alpha"], must_not=["zeta"]),  # passes both
        label(2, must=["alpha", "beta"], must_not=[]),  # misses beta; must_not passes (no entries)
        label(3, must=[], must_not=["zeta"]),  # excluded from must_mention_rate; says zeta
        label(4, must=[], must_not=[]),  # excluded from must_mention_rate; must_not passes
    ]
    parsed = parse_results(results(pred(1, reply="Alpha"), pred(2, reply="alpha"), pred(3, reply="ZETA"),
                                   pred(4, reply="x")), [1, 2, 3, 4])
    ev = score(labels, parsed)
    assert ev.must_mention_rate == 0.5  # 1 of the 2 rows with entries
    assert ev.must_not_mention_rate == 0.75  # 3 of all 4 rows
    assert [r.must_mention_ok for r in ev.rows] == [True, False, None, None]
    assert ev.summary()["counts"]["must_mention_rows"] == 2


def test_rates_with_no_rows_are_null_and_count_zero_in_composite():
    parsed = parse_results(results(pred(1, "a.x")), [1])
    ev = score([label(1, "a.x")], parsed, judge_scores=[1.0])
    assert ev.probe_accuracy is None and ev.must_mention_rate is None
    assert ev.composite == pytest.approx(0.4 * 1 + 0.3 * 1 + 0.2 * 0 + 0.1 * 1)


# --- reply score, efficiency, composite ---------------------------------------------------------

@pytest.mark.parametrize("judge, mm, mnm, expected", [
    (1.0, True, True, 1.0),
    (0.0, True, True, 0.5),
    (0.8, False, True, 0.5 * 0.8 + 0.25),
    (0.8, True, False, 0.5 * 0.8 + 0.25),
    (0.6, None, True, 0.5 * 0.6 + 0.5),  # no must_mention entries: checks = must_not only
    (0.6, None, False, 0.3),
    (0.0, False, False, 0.0),
])
def test_row_reply_score(judge, mm, mnm, expected):
    assert row_reply_score(judge, mm, mnm) == pytest.approx(expected)


def test_reply_score_is_mean_over_rows():
    labels = [label(1, must=["a"]), label(2, must=["zz"], must_not=["b"]), label(3, probe=True)]
    parsed = parse_results(results(pred(1, reply="a"), pred(2, reply="b"), pred(3, reply="c")), [1, 2, 3])
    ev = score(labels, parsed, judge_scores=[0.9, 0.5, 0.2])
    expected = [0.45 + 0.5, 0.25 + 0.0, 0.1 + 0.5]
    assert ev.reply_score == pytest.approx(sum(expected) / 3)
    assert ev.reply_similarity == pytest.approx((0.9 + 0.5 + 0.2) / 3)


@pytest.mark.parametrize("wall, expected", [
    (0.0, 1.0), (599.9, 1.0), (600.0, 1.0), (600.1, (1800 - 600.1) / 1200), (900.0, 0.75), (1200.0, 0.5),
    (1799.0, 1 / 1200), (1800.0, 0.0), (2000.0, 0.0), (None, 0.0), (math.inf, 0.0), (math.nan, 0.0),
])
def test_efficiency(wall, expected):
    assert efficiency(wall) == pytest.approx(expected)


def test_efficiency_zero_when_wall_clock_unusable():
    parsed = parse_results(results(pred(1), training={**TRAINING, "wall_clock_s": "fast"}), [1])
    assert score([label(1)], parsed).efficiency == 0.0


@pytest.mark.parametrize("parts, expected", [
    ((1.0, 1.0, 1.0, 1.0), 1.0),
    ((0.0, 0.0, 0.0, 0.0), 0.0),
    ((1.0, 0.0, 0.0, 0.0), 0.4),
    ((0.0, 1.0, 0.0, 0.0), 0.3),
    ((0.0, 0.0, 1.0, 0.0), 0.2),
    ((0.0, 0.0, 0.0, 1.0), 0.1),
    ((0.5, 0.6, 0.25, 0.5), 0.4 * 0.5 + 0.3 * 0.6 + 0.2 * 0.25 + 0.1 * 0.5),
    ((None, 1.0, None, 1.0), 0.4),
])
def test_composite(parts, expected):
    assert composite(*parts) == pytest.approx(expected)


def test_score_composite_uses_reply_score_and_efficiency():
    labels = [label(1, "a.x", must=["hello"]), label(2, "a.x", probe=True)]
    parsed = parse_results(results(pred(1), pred(2, "b.y"), training={**TRAINING, "wall_clock_s": 1200}), [1, 2])
    ev = score(labels, parsed, judge_scores=[1.0, 0.0])
    reply = ((0.5 + 0.5) + (0.0 + 0.5)) / 2
    assert ev.composite == pytest.approx(0.4 * 1.0 + 0.3 * reply + 0.2 * 0.0 + 0.1 * 0.5)


# --- synonyms file, output, command ---------------------------------------------------------------

@pytest.mark.parametrize("content, ok", [
    ('{"a": ["b", "c"]}', True),
    ('{"a": "b"}', False),
    ('{"a": [1]}', False),
    ('["a"]', False),
    ("{", False),
])
def test_load_synonyms(tmp_path, content, ok):
    path = tmp_path / "syn.json"
    path.write_text(content)
    if ok:
        assert load_synonyms(path) == {"a": ["b", "c"]}
    else:
        with pytest.raises(DataError):
            load_synonyms(path)


def test_summary_and_table_have_every_metric():
    parsed = parse_results(results(pred(1)), [1, 2])
    ev = score([label(1), label(2, probe=True)], parsed, judge_info={"name": "offline (MiniLM cosine)",
                                                                     "offline": True})
    keys = ["intent_accuracy", "probe_accuracy", "must_mention_rate", "must_not_mention_rate",
            "reply_similarity", "reply_score", "efficiency", "composite", "problems", "judge"]
    summary = ev.summary()
    assert all(k in summary for k in keys)
    json.dumps(summary, allow_nan=False)
    table = format_table(ev)
    assert all(k in table for k in keys[:8]) and "offline (MiniLM cosine)" in table
    assert "missing prediction for id 2" in table


def _write(tmp_path, labels: list[dict], res: dict):
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in labels) + "\n")
    (tmp_path / "results.json").write_text(json.dumps(res))


def _args(tmp_path, **kw) -> Namespace:
    base = dict(results=str(tmp_path / "results.json"), labels=str(tmp_path / "labels.jsonl"), synonyms=None,
                json=True, judge_model="gpt-4o-mini", budget_usd=3.0, judge_cache=str(tmp_path / "cache"),
                offline=True, report=None, weights=None, forgetting=None)
    return Namespace(**{**base, **kw})


def test_main_json_and_exit_codes(tmp_path, capsys, monkeypatch):
    import tickettune.tools.judge as judge

    # the offline judge is tested in test_judge; here a stand-in keeps this test in milliseconds
    monkeypatch.setattr(judge, "offline_scores", lambda pairs: [1.0] * len(pairs))
    rows = [{"id": "v1", "intent": "a.x", "ideal_reply": "hi", "must_mention": ["hi"]},
            {"id": "v2", "intent": "b.y", "ideal_reply": "yo", "probe": True}]
    _write(tmp_path, rows, results(pred("v1", "A.X", "hi"), pred("v2", "b.y", "yo")))
    assert main(_args(tmp_path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["intent_accuracy"], out["probe_accuracy"], out["problems"]) == (1.0, 1.0, [])
    assert out["judge"]["offline"] is True and out["judge"]["name"] == "offline (MiniLM cosine)"
    assert out["composite"] == pytest.approx(1.0)

    _write(tmp_path, rows, results(pred("v1", "A.X", "hi")))
    assert main(_args(tmp_path)) == 1  # scored, with problems
    assert "missing prediction for id 'v2'" in json.loads(capsys.readouterr().out)["problems"]

    (tmp_path / "results.json").write_text("{oops")
    assert main(_args(tmp_path)) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["intent_accuracy"] == 0.0 and len(out["problems"]) == 3

    (tmp_path / "labels.jsonl").write_text('{"id": 1}\n')
    assert main(_args(tmp_path)) == 2  # unusable labels
