"""Judges: the real `openai` SDK against a local OpenAI-compatible HTTP server; the real offline MiniLM."""

from __future__ import annotations

import json
import threading
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tickettune.tools import judge
from tickettune.tools.judge import (
    OFFLINE_NAME,
    cache_key,
    cost_usd,
    judge_replies,
    offline_scores,
    parse_score,
    price_for,
)

KEY = "test-key-5f1e2d3c4b"
PAIRS = [("Refunds take 14 days.", "We refund within 14 days."), ("Go to Settings.", "Open Settings."),
         ("Use SSO.", "Ask IT.")]


class FakeOpenAI(ThreadingHTTPServer):
    """POST /v1/chat/completions; `status` and `content` set the answer; `requests` records bodies."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.headers_seen: list[dict] = []
        self.status = 200
        self.content = '{"score": 8}'
        self.usage = {"prompt_tokens": 250, "completion_tokens": 6, "total_tokens": 256}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        server: FakeOpenAI = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append(body)
        server.headers_seen.append(dict(self.headers))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        if server.status != 200:
            return self._send(server.status, {"error": {"message": f"Payment required for key {KEY}",
                                                        "type": "billing", "code": "insufficient_quota"}})
        self._send(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": server.content}}],
            "usage": server.usage,
        })

    def _send(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server(monkeypatch):
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/v1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield srv
    srv.shutdown()
    srv.server_close()


def fake_offline(pairs):
    return [0.42] * len(pairs)


def run(tmp_path, pairs=PAIRS, **kw):
    kw = {"model": "gpt-4o-mini", "budget_usd": 3.0, "cache_dir": tmp_path / "cache", "fallback": fake_offline,
          "log": lambda m: print(m), "max_retries": 0, **kw}
    return judge_replies(pairs, **kw)


def test_llm_judge_scores_and_counts(server, tmp_path):
    result = run(tmp_path)
    assert result.scores == [0.8, 0.8, 0.8]
    assert (result.offline, result.name, result.calls, result.fallback) == (False, "gpt-4o-mini", 3, [False] * 3)
    assert (result.prompt_tokens, result.completion_tokens) == (750, 18)
    assert result.cost_usd == pytest.approx(cost_usd("gpt-4o-mini", 750, 18))
    assert result.cost_usd == pytest.approx((750 * 0.15 + 18 * 0.60) / 1e6)
    body = server.requests[0]
    assert body["temperature"] == 0 and body["model"] == "gpt-4o-mini"
    assert body["messages"][0]["content"] == judge.RUBRIC
    assert "Refunds take 14 days." in body["messages"][1]["content"]
    headers = {k.lower(): v for k, v in server.headers_seen[0].items()}
    assert headers["authorization"] == f"Bearer {KEY}"  # the SDK sent the key from the environment
    info = result.info()
    assert info["tokens"] == 768 and info["estimated_cost_usd"] > 0


def test_cache_hit_makes_no_second_request(server, tmp_path):
    first = run(tmp_path)
    assert len(server.requests) == 3
    second = run(tmp_path)
    assert len(server.requests) == 3  # the server saw nothing new
    assert second.scores == first.scores
    assert (second.calls, second.cache_hits, second.cost_usd) == (0, 3, 0.0)
    # the key covers model and content: another model or reply is a miss
    assert cache_key("gpt-4o-mini", "a", "b") != cache_key("gpt-4o", "a", "b")
    assert cache_key("gpt-4o-mini", "a", "b") != cache_key("gpt-4o-mini", "a", "c")
    run(tmp_path, model="gpt-4o")
    assert len(server.requests) == 6


@pytest.mark.parametrize("content, expected", [
    ('{"score": 10}', 1.0), ('{"score": 0}', 0.0), ('{"score": 7.5}', 0.75), ('{"score": 14}', 1.0),
    ('{"score": -2}', 0.0), ('```json\n{"score": 6}\n```', 0.6), ('{"score": "7"}', None),
    ("seven", None), ("", None), ('{"score": true}', None), ("[7]", None),
])
def test_parse_score(content, expected):
    assert parse_score(content) == expected


def test_unparseable_answer_falls_back_for_that_row_only(server, tmp_path):
    server.content = "I think it is good"
    result = run(tmp_path, pairs=PAIRS[:2])
    assert result.scores == [0.42, 0.42] and result.fallback == [True, True]
    assert result.calls == 2 and result.stopped is None  # it kept asking
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing unparseable is cached


def test_budget_stop_says_so(server, tmp_path, capsys):
    result = run(tmp_path, budget_usd=1e-9)
    assert server.requests == []  # even the first call would pass the budget
    assert result.stopped == "budget" and result.fallback == [True, True, True]
    assert result.scores == [0.42] * 3
    out = capsys.readouterr().out
    assert "budget reached" in out and "--budget-usd" in out
    assert any("scored by the offline (MiniLM cosine) judge" in n for n in result.notes)


def test_budget_stops_after_spending(server, tmp_path):
    server.usage = {"prompt_tokens": 2_000_000, "completion_tokens": 0, "total_tokens": 2_000_000}  # $0.30
    result = run(tmp_path, budget_usd=0.05)
    assert len(server.requests) == 1  # the first call fit the estimate, then the bill stopped the rest
    assert result.calls == 1 and result.stopped == "budget"
    assert result.scores == [0.8, 0.42, 0.42] and result.fallback == [False, True, True]
    assert result.cost_usd == pytest.approx(0.30)


def test_http_402_stops_calling_without_crashing(server, tmp_path, capsys):
    server.status = 402
    result = run(tmp_path)
    assert len(server.requests) == 1  # stopped after the first error
    assert result.stopped == "HTTP 402" and result.fallback == [True] * 3 and result.scores == [0.42] * 3
    captured = capsys.readouterr()
    assert "HTTP 402" in captured.out
    assert KEY not in captured.out + captured.err + json.dumps(result.info())  # the key is redacted


def test_connection_error_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # discard port: nothing listens
    result = run(tmp_path, pairs=PAIRS[:1])
    assert result.stopped and result.fallback == [True] and result.scores == [0.42]


def test_empty_reply_scores_zero_without_a_call(server, tmp_path):
    result = run(tmp_path, pairs=[("ideal", ""), ("ideal", "  ")])
    assert result.scores == [0.0, 0.0] and server.requests == []


def test_no_key_or_offline_flag_uses_offline_judge(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = run(tmp_path)
    assert (result.offline, result.name, result.scores) == (True, OFFLINE_NAME, [0.42] * 3)
    assert any("OPENAI_API_KEY is not set" in n for n in result.notes)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    result = run(tmp_path, offline=True)
    assert result.offline and result.notes == []


@pytest.mark.parametrize("model, price, known", [
    ("gpt-4o-mini", (0.15, 0.60), True),
    ("gpt-4o-mini-2024-07-18", (0.15, 0.60), True),
    ("gpt-4o", (2.50, 10.00), True),
    ("my-local-llama", (0.15, 0.60), False),
])
def test_price_table(model, price, known):
    assert price_for(model) == (price, known)


def test_unknown_model_price_is_noted(server, tmp_path):
    result = run(tmp_path, model="my-local-llama", pairs=PAIRS[:1])
    assert any("no price known for 'my-local-llama'" in n for n in result.notes)


def test_eval_command_through_the_llm_judge(server, tmp_path, capsys):
    from tickettune.tools.grade import main

    (tmp_path / "labels.jsonl").write_text(json.dumps(
        {"id": "v1", "intent": "a", "ideal_reply": "Refunds take 14 days.", "must_mention": ["14 days"]}) + "\n")
    (tmp_path / "results.json").write_text(json.dumps({
        "training": {"steps": 1, "train_loss": 1.0, "val_loss": 1.0, "wall_clock_s": 10},
        "predictions": [{"id": "v1", "prediction": "within 14 days", "predicted_intent": "a",
                         "latency_ms": 1, "tokens_used": 1}]}))
    args = Namespace(results=str(tmp_path / "results.json"), labels=str(tmp_path / "labels.jsonl"),
                     synonyms=None, json=False, judge_model="gpt-4o-mini", budget_usd=3.0,
                     judge_cache=str(tmp_path / "cache"), offline=False, report=None, weights=None,
                     forgetting=None)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "judge: gpt-4o-mini | calls 1" in captured.out and "est. cost $" in captured.out
    assert KEY not in captured.out + captured.err


def test_offline_judge_real_minilm():
    scores = offline_scores([("Refunds take 14 days.", "Refunds take 14 days."),
                             ("Refunds take 14 days.", "You can get your money back within two weeks."),
                             ("Refunds take 14 days.", "The Slack integration is under Settings → Apps.")])
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= scores[2] < scores[1] < scores[0] <= 1.0
