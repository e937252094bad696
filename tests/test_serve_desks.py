"""Many desks on one server: routing by `desk` / OpenAI's `model`, batches that never mix desks, the LRU
bound, the admin route that adds a desk while serving, streaming through the `openai` SDK, and the page's
key prompt and desk picker in headless Chromium. Fakes stand in for the models (test_serve.py's harness);
the real models are in the slow tests at the end (two trained desks, answers equal `tickettune predict`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, run_py, write_jsonl
from test_serve import (CHROMIUM, KEY, FakePredictor, child_env, free_port, live_server, run_app, serve_cmd,
                        tickets_body, until, wait_healthy)
from tickettune.pipeline.results import Prediction
from tickettune.tools.serve import Desk, DeskError, Desks, Settings, create_app

ADMIN = "tt-admin-key-2b9d41"


class DeskPredictor(FakePredictor):
    """A fake whose every reply names its desk, so a misrouted answer shows."""

    def __init__(self, desk: str, labels: list[str] | None = None) -> None:
        super().__init__()
        self.desk = desk
        if labels is not None:
            self.labels = labels

    def predict(self, tickets):
        preds, diags = super().predict(tickets)
        return [Prediction(p.id, f"[{self.desk}] {p.prediction}", p.predicted_intent, p.latency_ms, p.tokens_used)
                for p in preds], diags


def two_desks(max_loaded: int = 8, loads: list | None = None) -> tuple[Desks, dict]:
    made = {}

    def loader(name):
        def load(key):
            if loads is not None:
                loads.append(name)
            made[name] = DeskPredictor(name)
            return made[name]
        return load

    desks = Desks(max_loaded)
    for name in ("north", "quill"):
        desks.add(Desk(name, loader(name), labels=list(FakePredictor.labels)))
    return desks, made


def test_each_request_reaches_its_own_desk_and_a_batch_never_mixes_desks():
    desks, made = two_desks()
    app = create_app(desks=desks, settings=Settings(max_batch=8, max_wait_s=0.2))

    async def scenario(client):
        await until(lambda: app.state.backend.ready, "the desks to load")
        posts = [client.post("/v1/tickets", json={"desk": d, **tickets_body(f"refund {n}", ids=[f"{d}{n}"])})
                 for n, d in enumerate(["north", "quill", "north", "quill", "north"])]
        return await asyncio.gather(*posts)

    responses = run_app(app, scenario)
    assert [r.status_code for r in responses] == [200] * 5
    for r in responses:
        body = r.json()
        [p] = body["predictions"]
        assert p["prediction"].startswith(f"[{body['desk']}] ") and p["id"].startswith(body["desk"])
    assert [len(c) for c in made["north"].calls] == [3] and [len(c) for c in made["quill"].calls] == [2]


def test_the_desk_is_named_by_openais_model_and_an_unknown_one_is_404():
    desks, _ = two_desks()
    app = create_app(desks=desks)

    async def scenario(client):
        await until(lambda: app.state.backend.ready, "the desks to load")
        chat = await client.post("/v1/chat/completions", json={"model": "quill", "messages": [
            {"role": "user", "content": "login fails"}]})
        unknown = await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "x"}]})
        missing = await client.post("/v1/tickets", json=tickets_body("x"))
        wrong = await client.post("/v1/tickets", json={"desk": "nope", **tickets_body("x")})
        models = await client.get("/v1/models")
        return chat, unknown, missing, wrong, models

    chat, unknown, missing, wrong, models = run_app(app, scenario)
    assert chat.status_code == 200 and chat.json()["model"] == "quill"
    assert chat.json()["choices"][0]["message"]["content"].startswith("[quill] ")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    assert unknown.json()["error"]["param"] == "model" and "north, quill" in unknown.json()["error"]["message"]
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "desk"
    assert wrong.status_code == 404 and wrong.json()["error"]["param"] == "desk"
    assert [(m["id"], m["intents"]) for m in models.json()["data"]] == [("north", FakePredictor.labels),
                                                                         ("quill", FakePredictor.labels)]


def test_at_most_max_loaded_desks_stay_loaded_least_recently_used_goes():
    loads = []
    desks, _ = two_desks(max_loaded=1, loads=loads)
    app = create_app(desks=desks, settings=Settings(max_wait_s=0))

    async def scenario(client):
        await until(lambda: app.state.backend.ready, "the first desk to load")
        out = []
        for desk in ("north", "quill", "quill", "north"):
            r = await client.post("/v1/tickets", json={"desk": desk, **tickets_body("refund")})
            out.append((r.json()["predictions"][0]["prediction"], desks.loaded()))
        return out

    out = run_app(app, scenario)
    assert [o[0].split("]")[0] + "]" for o in out] == ["[north]", "[quill]", "[quill]", "[north]"]
    assert [o[1] for o in out] == [["north"], ["quill"], ["quill"], ["north"]]
    assert loads == ["north", "quill", "north"]  # loaded at start, on first use, and again after eviction


def test_a_desk_added_through_the_admin_route_answers_without_a_restart(tmp_path, monkeypatch):
    import test_serve

    desks, _ = two_desks()
    app = create_app(desks=desks, api_key=KEY, admin_key=ADMIN)
    added = Desk("third", lambda key: DeskPredictor("third", ["x.one", "x.two"]), labels=["x.one", "x.two"])
    monkeypatch.setattr(desks, "add_folder", lambda name, folder: desks.add(added) or added)
    body = {"name": "third", "weights": str(tmp_path)}

    async def scenario(client):
        await until(lambda: app.state.backend.ready, "the desks to load")
        user = {"Authorization": f"Bearer {KEY}"}
        refused = [await client.post("/v1/admin/desks", json=body, headers=h)
                   for h in ({}, user, {"Authorization": "Bearer nope"})]
        made = await client.post("/v1/admin/desks", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        again = await client.post("/v1/admin/desks", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        bad = await client.post("/v1/admin/desks", json={"name": "../x", "weights": "/"},
                                headers={"Authorization": f"Bearer {ADMIN}"})
        answer = await client.post("/v1/tickets", json={"desk": "third", **tickets_body("hello")}, headers=user)
        models = await client.get("/v1/models", headers=user)
        return refused, made, again, bad, answer, models

    refused, made, again, bad, answer, models = run_app(app, scenario)
    assert [r.status_code for r in refused] == [401, 401, 401]  # the user's key is not the admin's
    assert made.status_code == 201 and made.json()["id"] == "third" and made.json()["intents"] == ["x.one", "x.two"]
    assert again.status_code == 409 and bad.status_code == 400 and bad.json()["error"]["param"] == "name"
    assert answer.status_code == 200 and answer.json()["predictions"][0]["prediction"].startswith("[third] ")
    assert [m["id"] for m in models.json()["data"]] == ["north", "quill", "third"]
    assert test_serve  # the harness module (imported for its fakes)


def test_admin_routes_are_off_without_an_admin_key():
    app = create_app(FakePredictor())

    async def scenario(client):
        return await client.post("/v1/admin/desks", json={"name": "x", "weights": "/tmp"})

    off = run_app(app, scenario)
    assert off.status_code == 404 and "TICKETTUNE_ADMIN_KEY" in off.json()["error"]["message"]


def test_a_weights_folder_on_another_base_model_is_refused(monkeypatch, tmp_path):
    from tickettune.pipeline import weights_folder

    bases = {"a": "bundled:smollm2-135m", "b": "Qwen/Qwen2.5-7B-Instruct", "c": "bundled:smollm2-135m"}
    monkeypatch.setattr(weights_folder, "read_metadata", lambda folder: {
        "plan": {"model": bases[folder.name]}, "taxonomy": ["x", "y"]})
    desks = Desks()
    desks.add_folder("a", tmp_path / "a")
    with pytest.raises(DeskError, match=r"desk 'b' .* trained on Qwen/Qwen2.5-7B-Instruct, this server's desks on "
                                        r"bundled:smollm2-135m"):
        desks.add_folder("b", tmp_path / "b")
    desks.add_folder("c", tmp_path / "c")
    with pytest.raises(DeskError, match="exists already") as taken:
        desks.add_folder("c", tmp_path / "c")
    assert taken.value.status == 409 and desks.names() == ["a", "c"] and desks.loaded() == []
    assert desks.describe("a") == {"id": "a", "intents": ["x", "y"], "loaded": False, "base_model": bases["a"]}


def test_the_command_names_a_bad_desk_flag_and_exits_2(tmp_path):
    proc = subprocess.run(serve_cmd("--desk", "no-equals-sign", "--desk", f"x={tmp_path / 'missing'}"),
                          env=child_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "--desk no-equals-sign: expected NAME=WEIGHTS_DIR" in proc.stderr and "desk 'x'" in proc.stderr


def test_stream_true_is_server_sent_events_that_the_openai_sdk_reads():
    import openai

    with live_server(create_app(FakePredictor(), api_key=KEY, settings=Settings(model_name="desk"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        stream = client.chat.completions.create(model="desk", stream=True,
                                                messages=[{"role": "user", "content": "I was charged twice"}])
        chunks = list(stream)
        raw = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": "desk", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "reply to: I was charged twice"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].model == "desk" and getattr(chunks[0], "intent", None) == "billing.refund"
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]") and raw.text.count("data: ") == 3


def test_the_page_asks_for_the_key_picks_a_desk_and_sends_both(tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run installs the Debian package")
        pytest.skip("no Chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    desks, _ = two_desks()
    seen = []
    with live_server(create_app(desks=desks, api_key=KEY)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
            page.goto(url + "/")
            page.wait_for_selector("#key-form:not([hidden])", timeout=20_000)
            page.fill("#key", "wrong")
            page.click("#key-go")
            page.wait_for_selector("#key-form:not([hidden])", timeout=20_000)
            page.fill("#key", KEY)
            page.click("#key-go")
            page.wait_for_selector("#desk-row:not([hidden])", timeout=20_000)
            options = page.eval_on_selector_all("#desk option", "es => es.map(e => e.value)")
            page.select_option("#desk", "quill")
            page.fill("#ticket", "refund please")
            page.click("#go")
            page.wait_for_selector("#result:not([hidden])", timeout=20_000)
            reply = page.inner_text("#reply")
            stored = page.evaluate("sessionStorage.getItem('tickettune-key')")
            local = page.evaluate("localStorage.length")
        finally:
            browser.close()
    assert options == ["north", "quill"] and reply.startswith("[quill] ")
    assert stored == KEY and local == 0  # kept for the tab only
    assert (f"{url}/v1/tickets", f"Bearer {KEY}") in seen


# --- the real models (slow) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_trained(tiny_run, tmp_path_factory):
    """The shared tiny run (four intents of the sample) and a second desk trained on the sample's *other*
    intents (retrieved replies), so the two desks have different taxonomies."""
    proc, _, weights_a, _, val_rows = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    tmp = tmp_path_factory.mktemp("desk-b")
    train = [json.loads(line) for line in (ROOT / "data" / "northstar" / "train.jsonl").read_text().splitlines()]
    intents = sorted({r["intent"] for r in train})[4:8]
    rows = [r for r in train if r["intent"] in intents]
    config = {"train": {"epochs": 1, "max_steps": 2, "batch_size": 8}, "infer": {"reply_source": "retrieve"}}
    proc_b, _, weights_b = run_py(tmp, "b", write_jsonl(tmp / "train.jsonl", rows),
                                  write_jsonl(tmp / "val.jsonl", val_rows), config=config)
    assert proc_b.returncode == 0, proc_b.stderr[-3000:]
    return tmp, weights_a, weights_b, val_rows


def predict_cli(weights: Path, rows: list[dict], out: Path) -> list[dict]:
    src = write_jsonl(out.with_suffix(".jsonl"), rows)
    done = subprocess.run([sys.executable, "-m", "tickettune", "predict", "--weights", str(weights), "--input",
                           str(src), "--output", str(out)], env=child_env(), capture_output=True, text=True,
                          timeout=600, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["predictions"]


@pytest.mark.slow
def test_two_real_desks_in_one_process_answer_as_predict_does_and_a_third_joins(two_trained):
    """`tickettune serve --desk a=... --desk b=...` (one process, one base model): each desk's answers equal
    `tickettune predict` on its own weights, whichever desk ran before; a third desk added through the admin
    route while serving answers too."""
    tmp, weights_a, weights_b, val_rows = two_trained
    expected = {"a": predict_cli(weights_a, val_rows, tmp / "a.json"), "b": predict_cli(weights_b, val_rows, tmp / "b.json")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(serve_cmd("--desk", f"a={weights_a}", "--desk", f"b={weights_b}", "--port", str(port),
                                      "--max-batch", "1"),
                            env=child_env(TICKETTUNE_ADMIN_KEY=ADMIN), cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, proc)
        served = {}
        for desk in ("a", "b", "a", "b"):  # alternating: switching adapters must not leak between desks
            r = httpx.post(f"{url}/v1/tickets", json={"desk": desk, "tickets": val_rows}, timeout=300)
            assert r.status_code == 200, r.text
            served.setdefault(desk, []).append(r.json()["predictions"])
        added = httpx.post(f"{url}/v1/admin/desks", json={"name": "c", "weights": str(weights_a)},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        third = httpx.post(f"{url}/v1/tickets", json={"desk": "c", "tickets": val_rows[:1]}, timeout=300)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    finally:
        proc.terminate()
        proc.wait(60)
    for desk in ("a", "b"):
        want = [(p["id"], p["predicted_intent"], p["prediction"]) for p in expected[desk]]
        for answer in served[desk]:
            assert [(p["id"], p["predicted_intent"], p["prediction"]) for p in answer] == want, desk
    assert {p["predicted_intent"] for p in expected["a"]}.isdisjoint({p["predicted_intent"] for p in expected["b"]})
    assert added.status_code == 201 and third.status_code == 200
    assert third.json()["predictions"][0]["prediction"] == expected["a"][0]["prediction"]
    assert [m["id"] for m in models] == ["a", "b", "c"]
