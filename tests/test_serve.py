"""`tickettune serve`: the HTTP API, OpenAI's shape, the page, batching and hostile requests.

Fast tests run the app on a fake predictor (same `predict` signature as TicketModel), in process over
ASGI or on a real uvicorn socket, and the real server process with the fake selected by its test hook
(SIGTERM, logs, exit codes). Tests marked slow run the real bundled model end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, write_jsonl
from tickettune.pipeline.data import Ticket
from tickettune.pipeline.results import Prediction
from tickettune.pipeline.weights_folder import FORMAT, META_FILE
from tickettune.tools import serve
from tickettune.tools.serve import guard
from tickettune.tools.serve import Settings, create_app

KEY = "tt-test-key-7f3a9c1e55"
LABELS = ["account.login", "billing.refund", "other"]
TESTS = Path(__file__).resolve().parent


# --- a fake predictor ----------------------------------------------------------------------------

def intent_of(text: str) -> str:
    low = text.lower()
    return "billing.refund" if "refund" in low or "charge" in low else "account.login" if "login" in low else "other"


class FakePredictor:
    """Answers like TicketModel.predict: the reply echoes the ticket, so a misrouted answer shows.
    `gate` (a threading.Event) holds every call until set; a ticket containing "boom" raises."""

    labels = LABELS

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.calls: list[list[Ticket]] = []

    def predict(self, tickets: list[Ticket]) -> tuple[list[Prediction], list[dict]]:
        self.calls.append(list(tickets))
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        if any("boom" in t.ticket for t in tickets):
            raise RuntimeError("model exploded")
        preds, diags = [], []
        for t in tickets:
            intent = intent_of(t.ticket)
            others = [lab for lab in LABELS if lab != intent]
            preds.append(Prediction(t.id, f"reply to: {t.ticket[:60]}", intent, 5, 40))
            diags.append({"id": t.id, "intent_probs": {others[0]: 0.2, intent: 0.7, others[1]: 0.1},
                          "reply_action": "repaired"})
        return preds, diags


def gated_predictor() -> FakePredictor:
    """For the server process (TICKETTUNE_SERVE_PREDICTOR=test_serve:gated_predictor): each call
    writes `started` into $TICKETTUNE_TEST_GATE and waits until the test writes `release` there."""
    gate_dir = Path(os.environ["TICKETTUNE_TEST_GATE"])

    class Gated(FakePredictor):
        def predict(self, tickets):
            (gate_dir / "started").write_text(str(len(tickets)))
            deadline = time.monotonic() + 60
            while not (gate_dir / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return super().predict(tickets)

    return Gated()


def failing_loader() -> FakePredictor:
    raise RuntimeError("no such model here")


# --- harness ---------------------------------------------------------------------------------------

def run_app(app, scenario):
    """Run `scenario(client)` against `app` in process (ASGI, lifespan included)."""
    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", timeout=30) as client:
                return await scenario(client)
    return asyncio.run(main())


async def until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def tickets_body(*texts: str, ids=None) -> dict:
    return {"tickets": [{"id": i, "ticket": t} for i, t in zip(ids or [f"t{n}" for n in range(len(texts))], texts)]}


@contextlib.contextmanager
def live_server(app):
    """The app on a real uvicorn socket (a thread of this process), yielding its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", serve.API_KEY_ENV)}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"} | extra


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError("server never became healthy")


# --- the API on a fake predictor -------------------------------------------------------------------

def test_tickets_answer_every_field_in_order():
    fake = FakePredictor()
    app = create_app(fake, settings=Settings(max_batch=2, max_wait_s=0))

    async def scenario(client):
        return await client.post("/v1/tickets", json=tickets_body("I want a refund", "login fails", "hello",
                                                                  ids=["a", 7, "c"]))

    response = run_app(app, scenario)
    assert response.status_code == 200
    preds = response.json()["predictions"]
    assert [p["id"] for p in preds] == ["a", 7, "c"]
    assert [p["predicted_intent"] for p in preds] == ["billing.refund", "account.login", "other"]
    assert [p["prediction"] for p in preds] == ["reply to: I want a refund", "reply to: login fails", "reply to: hello"]
    for p in preds:
        assert set(p) == {"id", "predicted_intent", "prediction", "intent_scores", "reply_source", "latency_ms"}
        assert list(p["intent_scores"].values()) == [0.7, 0.2, 0.1]  # most likely first
        assert next(iter(p["intent_scores"])) == p["predicted_intent"]
        assert p["reply_source"] == "repaired" and isinstance(p["latency_ms"], int) and p["latency_ms"] >= 0
    assert [len(c) for c in fake.calls] == [2, 1]  # max batch 2: three tickets in two model calls


def test_concurrent_requests_are_gathered_into_one_batch_and_answered_each_their_own():
    gate = threading.Event()
    fake = FakePredictor(gate)
    app = create_app(fake, settings=Settings(max_batch=8, max_wait_s=0))
    texts = [f"ticket number {n} about a refund" if n % 2 else f"ticket number {n}" for n in range(5)]

    async def scenario(client):
        first = asyncio.create_task(client.post("/v1/tickets", json=tickets_body("warm up")))
        await until(lambda: len(fake.calls) == 1, "the first batch")  # the worker is busy with it
        rest = [asyncio.create_task(client.post("/v1/tickets", json=tickets_body(t, ids=[f"r{n}"])))
                for n, t in enumerate(texts)]
        await until(lambda: app.state.batcher.queued == len(texts), "five queued tickets")
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run_app(app, scenario)
    assert first.status_code == 200
    assert [len(c) for c in fake.calls] == [1, 5]  # the five waiting requests: one model call
    for n, (text, response) in enumerate(zip(texts, rest)):
        [p] = response.json()["predictions"]
        assert (p["id"], p["prediction"], p["predicted_intent"]) == (f"r{n}", f"reply to: {text}", intent_of(text))


def test_a_batch_never_exceeds_max_batch():
    gate = threading.Event()
    fake = FakePredictor(gate)
    app = create_app(fake, settings=Settings(max_batch=2, max_wait_s=0))

    async def scenario(client):
        first = asyncio.create_task(client.post("/v1/tickets", json=tickets_body("warm up")))
        await until(lambda: len(fake.calls) == 1, "the first batch")
        rest = [asyncio.create_task(client.post("/v1/tickets", json=tickets_body(f"q{n}"))) for n in range(5)]
        await until(lambda: app.state.batcher.queued == 5, "five queued tickets")
        gate.set()
        return [r.status_code for r in [await first, *await asyncio.gather(*rest)]]

    assert run_app(app, scenario) == [200] * 6
    assert [len(c) for c in fake.calls] == [1, 2, 2, 1]


def test_a_full_batch_goes_without_waiting_out_max_wait():
    fake = FakePredictor()
    app = create_app(fake, settings=Settings(max_batch=3, max_wait_s=120))  # a lone ticket would wait 2 min

    async def scenario(client):
        return await asyncio.wait_for(asyncio.gather(*(client.post("/v1/tickets", json=tickets_body(f"q{n}"))
                                                       for n in range(3))), timeout=60)

    assert [r.status_code for r in run_app(app, scenario)] == [200] * 3
    assert [len(c) for c in fake.calls] == [3]


def test_a_full_queue_is_503_with_retry_after_and_the_queued_requests_still_complete():
    gate = threading.Event()
    fake = FakePredictor(gate)
    app = create_app(fake, settings=Settings(max_batch=1, max_wait_s=0, max_queue=2))

    async def scenario(client):
        busy = asyncio.create_task(client.post("/v1/tickets", json=tickets_body("in the model")))
        await until(lambda: len(fake.calls) == 1, "the first batch")
        queued = [asyncio.create_task(client.post("/v1/tickets", json=tickets_body(f"queued {n}"))) for n in range(2)]
        await until(lambda: app.state.batcher.queued == 2, "a full queue")
        refused = await client.post("/v1/tickets", json=tickets_body("one too many"))
        health = await client.get("/healthz")
        gate.set()
        done = [await busy, *await asyncio.gather(*queued)]
        after = await client.post("/v1/tickets", json=tickets_body("later"))
        return refused, health, done, after

    refused, health, done, after = run_app(app, scenario)
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "overloaded_error" and "queue is full" in refused.json()["error"]["message"]
    assert health.status_code == 200 and health.json()["queued"] == 2  # health is not the queue's business
    assert [r.status_code for r in done] == [200, 200, 200] and after.status_code == 200
    assert "one too many" not in [t.ticket for call in fake.calls for t in call]


def test_more_tickets_than_the_queue_holds_is_413():
    fake = FakePredictor()
    app = create_app(fake, settings=Settings(max_queue=3))

    async def scenario(client):
        return await client.post("/v1/tickets", json=tickets_body(*[f"q{n}" for n in range(4)]))

    response = run_app(app, scenario)
    assert response.status_code == 413 and response.json()["error"]["param"] == "tickets" and not fake.calls


def test_a_model_failure_is_500_for_that_request_only_and_the_server_goes_on(caplog):
    gate = threading.Event()
    fake = FakePredictor(gate)
    app = create_app(fake, settings=Settings(max_batch=8, max_wait_s=0))

    async def scenario(client):
        busy = asyncio.create_task(client.post("/v1/tickets", json=tickets_body("warm up")))
        await until(lambda: len(fake.calls) == 1, "the first batch")
        mixed = [asyncio.create_task(client.post("/v1/tickets", json=tickets_body(t, ids=[t])))
                 for t in ("fine one", "boom goes the model", "fine two")]
        await until(lambda: app.state.batcher.queued == 3, "three queued requests")
        gate.set()
        responses = [await busy, *await asyncio.gather(*mixed)]
        after = await client.post("/v1/tickets", json=tickets_body("still serving"))
        return responses, after

    responses, after = run_app(app, scenario)
    assert [r.status_code for r in responses] == [200, 200, 500, 200]
    error = responses[2].json()["error"]
    assert error["type"] == "server_error" and "model failed on this request" in error["message"]
    assert responses[1].json()["predictions"][0]["prediction"] == "reply to: fine one"
    assert responses[3].json()["predictions"][0]["prediction"] == "reply to: fine two"
    # the mixed batch failed, then each request was predicted alone
    assert [[t.id for t in c] for c in fake.calls[1:5]] == [["fine one", "boom goes the model", "fine two"],
                                                          ["fine one"], ["boom goes the model"], ["fine two"]]
    assert after.status_code == 200
    assert "RuntimeError: model exploded" in caplog.text  # the traceback is in the log, not in the answer
    assert "exploded" not in error["message"]


def test_a_ticket_over_100000_characters_is_truncated_with_a_warning(caplog):
    fake = FakePredictor()
    app = create_app(fake)
    long_ticket = "refund " + "x" * 149_993

    async def scenario(client):
        a = await client.post("/v1/tickets", json=tickets_body(long_ticket, ids=["long"]))
        b = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                        "content": long_ticket}]})
        return a, b

    a, b = run_app(app, scenario)
    assert a.status_code == 200 and b.status_code == 200
    assert [len(c[0].ticket) for c in fake.calls] == [100_000, 100_000]
    assert fake.calls[0][0].ticket == long_ticket[:100_000]
    assert "ticket 'long' has 150000 characters: truncated to 100000" in caplog.text


def test_chat_completions_have_openais_shape_and_the_intent():
    fake = FakePredictor()
    app = create_app(fake, settings=Settings(model_name="desk-model"))
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "old question"},
                {"role": "assistant", "content": "old answer"},
                {"role": "user", "content": [{"type": "text", "text": "Please refund"}, {"type": "text", "text": "me"}]}]

    async def scenario(client):
        return await client.post("/v1/chat/completions", json={"model": "anything", "messages": messages,
                                                                "temperature": 0, "max_tokens": 50})

    response = run_app(app, scenario)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "desk-model"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "reply to: Please refund\nme", "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    assert body["intent"] == "billing.refund" and body["reply_source"] == "repaired"
    assert list(body["intent_scores"]) == ["billing.refund", "account.login", "other"]
    assert body["usage"]["total_tokens"] == 40
    assert [t.ticket for t in fake.calls[0]] == ["Please refund\nme"]  # the last user message only


def test_models_lists_the_served_model_and_its_intents():
    app = create_app(FakePredictor(), settings=Settings(model_name="desk-model"))

    async def scenario(client):
        return await client.get("/v1/models")

    body = run_app(app, scenario).json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["intents"]) for m in body["data"]] == [("desk-model", "model", LABELS)]


BAD_REQUESTS = [
    ("/v1/tickets", b"{not json", "body", "malformed JSON"),
    ("/v1/tickets", b"\xff\xfe{}", "body", "not valid UTF-8"),
    ("/v1/tickets", b"[1, 2]", "body", "expected a JSON object, got array"),
    ("/v1/tickets", {}, "tickets", "missing field"),
    ("/v1/tickets", {"tickets": "hello"}, "tickets", "must be an array"),
    ("/v1/tickets", {"tickets": [3]}, "tickets[0]", "must be an object"),
    ("/v1/tickets", {"tickets": [{"ticket": "x"}]}, "tickets[0].id", "missing field"),
    ("/v1/tickets", {"tickets": [{"id": "a"}]}, "tickets[0].ticket", "missing field"),
    ("/v1/tickets", {"tickets": [{"id": "a", "ticket": 5}]}, "tickets[0].ticket", "must be a string, got integer"),
    ("/v1/tickets", {"tickets": [{"id": True, "ticket": "x"}]}, "tickets[0].id", "got boolean"),
    ("/v1/tickets", {"tickets": [{"id": 1.5, "ticket": "x"}]}, "tickets[0].id", "got number"),
    ("/v1/tickets", {"tickets": [{"id": "", "ticket": "x"}]}, "tickets[0].id", "is empty"),
    ("/v1/tickets", {"tickets": [{"id": "i" * 300, "ticket": "x"}]}, "tickets[0].id", "longer than 256"),
    ("/v1/tickets", {"tickets": [{"id": "a", "ticket": "x"}, {"id": "a", "ticket": "y"}]}, "tickets[1].id",
     "duplicated id 'a' (first at tickets[0])"),
    ("/v1/chat/completions", {}, "messages", "missing field"),
    ("/v1/chat/completions", {"messages": {"role": "user"}}, "messages", "must be an array"),
    ("/v1/chat/completions", {"messages": []}, "messages", "no message with role \"user\""),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "messages", "no message with role"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]", "must be an object"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role", "missing field"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content", "missing field"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "must be a string or an array of text parts, got integer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", "only {\"type\": \"text\""),
    ("/v1/chat/completions", {"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model", "must be a string"),
    ("/v1/chat/completions", {"stream": "yes", "messages": [{"role": "user", "content": "x"}]}, "stream", "must be a boolean"),
    ("/v1/chat/completions", {"n": 3, "messages": [{"role": "user", "content": "x"}]}, "n", "only one choice"),
]


@pytest.mark.parametrize(("path", "body", "param", "problem"), BAD_REQUESTS,
                         ids=[f"{p.split('/')[-1]}-{param}-{n}" for n, (p, _, param, _) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_400_naming_the_field(path, body, param, problem):
    fake = FakePredictor()
    app = create_app(fake)

    async def scenario(client):
        if isinstance(body, bytes):
            return await client.post(path, content=body, headers={"content-type": "application/json"})
        return await client.post(path, json=body)

    response = run_app(app, scenario)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: ") and problem in error["message"], error["message"]
    assert not fake.calls


def test_unknown_routes_and_methods_answer_in_the_error_shape():
    app = create_app(FakePredictor())

    async def scenario(client):
        return await client.get("/v2/nothing"), await client.get("/v1/tickets")

    missing, wrong_method = run_app(app, scenario)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# --- API key ---------------------------------------------------------------------------------------

def test_with_a_key_every_endpoint_but_healthz_and_the_page_needs_it(caplog, monkeypatch):
    compared = []
    real_compare = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: compared.append(1) or real_compare(a, b))
    fake = FakePredictor()
    app = create_app(fake, api_key=KEY)
    calls = [("GET", "/v1/models", None), ("POST", "/v1/tickets", tickets_body("refund me")),
             ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "refund me"}]}),
             ("GET", "/v2/unknown", None)]
    wrong = [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"},
             {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}]

    async def scenario(client):
        refused = [await client.request(m, p, json=b, headers=h) for m, p, b in calls for h in wrong]
        allowed = [await client.request(m, p, json=b, headers={"Authorization": f"Bearer {KEY}"}) for m, p, b in calls]
        lower = await client.get("/v1/models", headers={"authorization": f"bearer {KEY}"})
        health = await client.get("/healthz")
        page = [await client.get(path) for path in ("/", "/page.js")]  # no data in them; the page asks for the key
        return refused, allowed, lower, health, page

    refused, allowed, lower, health, page = run_app(app, scenario)
    assert [r.status_code for r in page] == [200, 200] and "fake" not in page[0].text.lower()
    assert {r.status_code for r in refused} == {401}
    assert all(r.headers["WWW-Authenticate"] == "Bearer" and r.json()["error"]["type"] == "authentication_error"
               for r in refused)
    assert [r.status_code for r in allowed] == [200, 200, 200, 404] and lower.status_code == 200
    assert health.status_code == 200
    assert len(fake.calls) == 2  # only the authorised requests reached the model
    assert compared  # the key was compared in constant time
    assert KEY not in caplog.text and all(KEY not in r.text for r in refused + allowed)


# --- body limit ------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_413_whether_declared_or_streamed():
    fake = FakePredictor()
    app = create_app(fake, settings=Settings(max_body=2000))
    body = json.dumps(tickets_body("refund")).encode()
    exact = body[:-1] + b" " * (2000 - len(body)) + b"}"
    assert len(exact) == 2000

    async def chunks(data: bytes):
        for i in range(0, len(data), 500):
            yield data[i:i + 500]

    async def scenario(client):
        declared = await client.post("/v1/tickets", content=exact + b" ")
        streamed = await client.post("/v1/tickets", content=chunks(exact + b" " * 1000))  # no Content-Length
        at_limit = await client.post("/v1/tickets", content=exact)
        return declared, streamed, at_limit

    declared, streamed, at_limit = run_app(app, scenario)
    assert declared.status_code == 413 and streamed.status_code == 413
    assert "body larger than 2000 bytes" in declared.json()["error"]["message"]
    assert at_limit.status_code == 200 and len(fake.calls) == 1


def test_the_default_limit_is_1_mb_on_a_real_socket():
    fake = FakePredictor()
    with live_server(create_app(fake)) as url:
        big = httpx.post(f"{url}/v1/tickets", content=b'{"tickets": [], "pad": "' + b"x" * 1_100_000 + b'"}', timeout=30)
        fits = httpx.post(f"{url}/v1/tickets", json=tickets_body("refund " + "y" * 900_000), timeout=30)
    assert big.status_code == 413 and big.json()["error"]["message"] == "body larger than 1000000 bytes"
    assert fits.status_code == 200 and len(fake.calls) == 1


# --- readiness ---------------------------------------------------------------------------------------

def test_healthz_is_503_while_the_model_loads_and_200_after():
    release = threading.Event()
    failures = []

    def loader():
        assert release.wait(30)
        return FakePredictor()

    app = create_app(loader=loader, on_load_failure=lambda: failures.append(1))

    async def scenario(client):
        loading = await client.get("/healthz")
        early = await client.post("/v1/tickets", json=tickets_body("refund"))
        release.set()
        await until(lambda: app.state.backend.ready, "the model")
        return loading, early, await client.get("/healthz"), await client.post("/v1/tickets", json=tickets_body("x"))

    loading, early, ready, later = run_app(app, scenario)
    assert loading.status_code == 503 and loading.json() == {"status": "loading"}
    assert early.status_code == 503 and "still loading" in early.json()["error"]["message"] and early.headers["Retry-After"]
    assert ready.status_code == 200 and ready.json()["status"] == "ok" and later.status_code == 200
    assert not failures


def test_a_model_that_fails_to_load_stops_the_server(caplog):
    stopped = []
    app = create_app(loader=failing_loader, on_load_failure=lambda: stopped.append(1))

    async def scenario(client):
        await until(lambda: app.state.backend.load_error is not None, "the load to fail")
        await until(lambda: stopped, "the stop callback")
        return await client.get("/healthz")

    health = run_app(app, scenario)
    assert health.status_code == 503 and health.json() == {"status": "failed"}
    assert "cannot load the model" in caplog.text and "no such model here" in caplog.text


# --- the openai SDK against a real socket ----------------------------------------------------------

def test_the_openai_sdk_talks_to_the_server():
    import openai

    fake = FakePredictor()
    with live_server(create_app(fake, api_key=KEY, settings=Settings(model_name="desk-model"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        completion = client.chat.completions.create(
            model="desk-model", messages=[{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "I was charged twice"}])
        models = client.models.list()
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="desk-model", messages=[{"role": "system", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert completion.choices[0].message.content == "reply to: I was charged twice"
    assert completion.choices[0].message.role == "assistant" and completion.model == "desk-model"
    assert completion.intent == "billing.refund" and completion.reply_source == "repaired"
    assert completion.intent_scores["billing.refund"] == 0.7
    assert [m.id for m in models.data] == ["desk-model"]
    assert "messages" in str(bad.value) and "no message with role" in str(bad.value)


# --- the page ----------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_the_page_needs_nothing_from_outside():
    page = serve.PAGE.lower()
    for outside in ("http://", "https://", "//cdn", "@import", "url("):
        assert outside not in page, outside
    # the empty favicon and the page's own script, from this server
    assert re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page) == ["data:,", "page.js"]
    csp = serve.PAGE_HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp.split("style-src")[0]
    assert "script-src 'self'" in csp
    for outside in ("http://", "https://", "import(", "eval("):
        assert outside not in serve.PAGE_SCRIPT, outside


def test_the_page_in_headless_chromium(tmp_path, record_property):
    """A person pastes a ticket and sees the intent with its confidence bar, the alternatives and the reply;
    a ticket carrying HTML is shown as text. The screenshot is kept (path printed, and recorded as a
    property; also copied into $TICKETTUNE_SCREENSHOT_DIR when set)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run installs the Debian package")
        pytest.skip("no Chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    fake = FakePredictor()
    hostile = '<img src=x onerror="window.pwned=1">'
    with live_server(create_app(fake)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 820})
            requested, console_errors = [], []
            page.on("request", lambda r: requested.append(r.url))
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.goto(url + "/")
            page.fill("#ticket", "Hi, I was charged twice for March and need a refund please.")
            page.click("#go")
            page.wait_for_selector("#result:not([hidden])", timeout=20_000)
            intent = page.inner_text("#intent")
            confidence = page.inner_text("#confidence .value")
            width = page.eval_on_selector("#confidence .fill", "e => e.style.width")
            alternatives = page.eval_on_selector_all("#alternatives .label", "es => es.map(e => e.textContent)")
            reply = page.inner_text("#reply")
            source = page.inner_text("#source")
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            page.fill("#ticket", hostile)
            page.press("#ticket", "Control+Enter")
            page.wait_for_selector("#reply:has-text('onerror')", timeout=20_000)
            shown = page.inner_text("#reply")
            pwned = page.evaluate("window.pwned === 1 || document.querySelector('#result img') !== null")
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    record_property("screenshot", str(shot))
    if os.environ.get("TICKETTUNE_SCREENSHOT_DIR"):
        kept = Path(os.environ["TICKETTUNE_SCREENSHOT_DIR"]) / shot.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, kept)
        print(f"screenshot kept: {kept}")
    assert intent == "billing.refund" and confidence == "70.0%" and float(width.rstrip("%")) == 70
    assert alternatives == ["account.login", "other"]
    assert reply == "reply to: Hi, I was charged twice for March and need a refund please."
    assert source == "generated, facts restored"
    assert shown == f"reply to: {hostile}" and not pwned
    assert all(u.startswith(url) for u in requested), requested  # nothing from outside
    assert not console_errors, console_errors  # the CSP let the page's own script run
    assert shot.stat().st_size > 10_000


# --- the command and the process -------------------------------------------------------------------

def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tickettune", "serve", *args]


@pytest.mark.parametrize(("setup", "extra", "expected"), [
    ("missing", [], "no such weights folder"),
    ("incomplete", [], "incomplete weights folder, missing adapter_model.safetensors"),
    ("ok", ["--max-batch", "0"], "--max-batch 0: must be >= 1"),
    ("ok-empty-key", [], "TICKETTUNE_API_KEY is set but empty"),
])
def test_the_command_refuses_to_start_with_exit_2_before_binding(tmp_path, setup, extra, expected):
    weights = tmp_path / "weights"
    if setup == "incomplete":
        weights.mkdir()
        (weights / META_FILE).write_text(json.dumps({"format": FORMAT, "plan": {}, "config": {}}))
        (weights / "adapter_config.json").write_text("{}")
    env = child_env()
    if setup.startswith("ok"):  # the folder is never read: the hook stands in for it
        env[serve.PREDICTOR_HOOK_ENV] = "test_serve:gated_predictor"
        env["PYTHONPATH"] = str(TESTS)
    if setup == "ok-empty-key":
        env[serve.API_KEY_ENV] = "  "
    port = free_port()
    proc = subprocess.run(serve_cmd("--weights", str(weights), "--port", str(port), *extra), env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot start" in proc.stderr and expected in proc.stderr
    assert "Uvicorn running" not in proc.stderr and "load" not in proc.stderr.split("cannot start")[0]


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tmp_path):
    """The real server process (uvicorn), the fake predictor selected by the test hook, an API key set:
    a request is inside the model when SIGTERM arrives; the server stops listening, answers it with
    200 and exits 0. Its log has one line per batch and never the key."""
    gate = tmp_path / "gate"
    gate.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = child_env(**{serve.PREDICTOR_HOOK_ENV: "test_serve:gated_predictor", "PYTHONPATH": str(TESTS),
                       "TICKETTUNE_TEST_GATE": str(gate), serve.API_KEY_ENV: KEY})
    proc = subprocess.Popen(serve_cmd("--weights", "unused", "--port", str(port)), env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, proc, timeout=60)
        answer = {}

        def client():
            answer["response"] = httpx.post(f"{url}/v1/tickets", json=tickets_body("refund please", ids=["r1"]),
                                            headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

        thread = threading.Thread(target=client)
        thread.start()
        deadline = time.monotonic() + 30
        while not (gate / "started").exists():
            assert time.monotonic() < deadline, "the request never reached the model"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # shutting down: no new connections
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        assert proc.poll() is None and thread.is_alive()  # the request is still in the model
        (gate / "release").write_text("go")
        thread.join(30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    response = answer["response"]
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["prediction"] == "reply to: refund please"
    assert code == 0, stderr[-3000:]
    assert "batch 1: 1 tickets from 1 requests" in stderr and "Shutting down" in stderr
    assert KEY not in stderr and KEY not in proc.stdout.read()


# --- the real model (slow) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """The shared real weights folder (conftest's `tiny_run`: run.py on four intents of the sample,
    a few steps), a folder of this module's own, the intents and four val rows."""
    proc, _, weights, train_rows, val_rows = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path_factory.mktemp("serve"), weights, sorted({r["intent"] for r in train_rows}), val_rows


@pytest.mark.slow
def test_the_served_model_answers_like_tickettune_predict_and_speaks_openai(trained):
    """`tickettune serve --max-batch 1` (the real process, the real model): for the same ticket, its
    /v1/tickets answer and its chat completion (through the openai SDK) equal `tickettune predict`'s."""
    import openai

    tmp, weights, intents, val_rows = trained
    ticket = val_rows[0]
    one = write_jsonl(tmp / "one.jsonl", [ticket])
    predicted = subprocess.run([sys.executable, "-m", "tickettune", "predict", "--weights", str(weights),
                                "--input", str(one), "--output", str(tmp / "predicted.json")],
                               env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    [expected] = json.loads((tmp / "predicted.json").read_text())["predictions"]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(serve_cmd("--weights", str(weights), "--port", str(port), "--max-batch", "1"),
                            env=child_env(**{serve.API_KEY_ENV: KEY}), cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, proc)
        auth = {"Authorization": f"Bearer {KEY}"}
        answer = httpx.post(f"{url}/v1/tickets", json={"tickets": [ticket]}, headers=auth, timeout=300)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        chat = client.chat.completions.create(model="tickettune", messages=[{"role": "user", "content": ticket["ticket"]}])
        models = client.models.list()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert code == 0, stderr[-3000:]
    assert answer.status_code == 200, answer.text
    [served] = answer.json()["predictions"]
    assert (served["id"], served["predicted_intent"], served["prediction"]) == \
           (expected["id"], expected["predicted_intent"], expected["prediction"])
    assert set(served["intent_scores"]) == set(intents) and abs(sum(served["intent_scores"].values()) - 1) < 0.01
    assert served["reply_source"] in ("retrieved", "generated", "repaired", "fallback")
    assert chat.choices[0].message.content == expected["prediction"] and chat.intent == expected["predicted_intent"]
    assert chat.usage.total_tokens > 0
    assert [m.id for m in models.data] == ["tickettune"] and models.data[0].intents == intents
    assert KEY not in stderr and len(re.findall(r"batch \d+: ", stderr)) == 2  # one line per batch
    assert "intent scoring" not in stderr  # the model's own per-call lines are quiet without -v


@pytest.mark.slow
def test_under_batching_the_intents_are_identical(trained):
    """The same tickets, one per request, served with --max-batch 1 and then gathered into one batch:
    the intents are identical (the replies may differ by padding; the share is printed)."""
    from tickettune.pipeline.ticket_model import TicketModel

    _, weights, _, val_rows = trained
    model = TicketModel.load(weights)

    class Recording:
        labels = model.labels

        def __init__(self):
            self.sizes = []

        def predict(self, tickets):
            self.sizes.append(len(tickets))
            return model.predict(tickets)

    def serve_all(max_batch: int) -> tuple[list[dict], list[int]]:
        recording = Recording()
        gate_open = max_batch == 1
        app = create_app(recording, settings=Settings(max_batch=max_batch, max_wait_s=0 if gate_open else 30))

        async def scenario(client):
            responses = await asyncio.gather(*(client.post("/v1/tickets", json={"tickets": [row]}) for row in val_rows))
            return [r.json()["predictions"][0] for r in responses]

        return run_app(app, scenario), recording.sizes

    alone, alone_sizes = serve_all(1)
    batched, batched_sizes = serve_all(len(val_rows))  # the full batch goes at once, max wait aside
    assert alone_sizes == [1] * len(val_rows) and batched_sizes == [len(val_rows)]
    assert [p["id"] for p in batched] == [r["id"] for r in val_rows]
    assert [p["predicted_intent"] for p in batched] == [p["predicted_intent"] for p in alone]
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(alone, batched))
    print(f"identical replies under batching: {same}/{len(val_rows)}")


@pytest.mark.slow
def test_the_load_bench_prints_its_table(trained, tmp_path):
    """bench/serve_load.py on the real model, a handful of requests (the numbers are the bench's business)."""
    _, weights, _, _ = trained
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--weights", str(weights),
                           "--clients", "1,3", "--single-requests", "2", "--requests", "3", "--json", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| clients | requests | p50 ms | p95 ms | requests/s | mean batch |" in proc.stdout
    result = json.loads(out.read_text())
    assert [(p["clients"], p["requests"], p["errors"]) for p in result["phases"]] == [(1, 2, 0), (3, 3, 0)]
    assert result["phases"][0]["mean_batch"] == 1.0
    assert result["identical_intents_3"] == [2, 2]  # intents never change under batching
