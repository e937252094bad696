"""Past one process: `tickettune serve --ray` on a local Ray cluster (2 replicas on this 2-core machine,
fractional CPUs), and `tickettune predict --ray` (a Ray Data actor pool) against the plain path.

The serve test runs the real command with the fake predictor of test_serve.py (selected by the server's test
hook; PYTHONPATH lets Ray's worker processes import it): every hostile-request case of the one-process
server is asked again through Ray Serve's proxy. The predict test (slow) runs the real model in the actors.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from test_serve import KEY, child_env, free_port, serve_cmd, tickets_body, wait_healthy

pytest.importorskip("ray", reason="ray is an optional extra: pip install 'ray[serve,data]'")
TESTS = Path(__file__).resolve().parent


def test_serve_on_ray_answers_and_refuses_as_one_process_does(tmp_path):
    import openai

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = child_env(TICKETTUNE_SERVE_PREDICTOR="test_serve:FakePredictor", TICKETTUNE_API_KEY=KEY,
                    PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(serve_cmd("--weights", "unused", "--ray", "--replicas", "2", "--replica-cpus", "0.5",
                                      "--port", str(port), "--max-body-bytes", "2000", "--max-queue", "8"),
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url, proc, timeout=240)
        auth = {"Authorization": f"Bearer {KEY}"}
        ok = httpx.post(f"{url}/v1/tickets", json=tickets_body("refund please", "login fails", ids=["a", 2]),
                        headers=auth, timeout=60)
        failing = httpx.post(f"{url}/v1/tickets", json=tickets_body("boom"), headers=auth, timeout=60)
        after = httpx.post(f"{url}/v1/tickets", json=tickets_body("refund"), headers=auth, timeout=60)
        refused = httpx.post(f"{url}/v1/tickets", json=tickets_body("x"), timeout=30)
        bad = httpx.post(f"{url}/v1/tickets", json={"tickets": [{"id": "a"}]}, headers=auth, timeout=30)
        big = httpx.post(f"{url}/v1/tickets", json=tickets_body("x" * 3000), headers=auth, timeout=30)
        many = httpx.post(f"{url}/v1/tickets", json=tickets_body(*["x"] * 9), headers=auth, timeout=30)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="tickettune", messages=[{"role": "user", "content": "refund"}])
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tickettune", stream=True, messages=[{"role": "user", "content": "login"}]) if c.choices)
        health = httpx.get(f"{url}/healthz", timeout=10).json()
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert ok.status_code == 200, ok.text
    assert [(p["id"], p["predicted_intent"], p["prediction"]) for p in ok.json()["predictions"]] == [
        ("a", "billing.refund", "reply to: refund please"), (2, "account.login", "reply to: login fails")]
    assert failing.status_code == 500 and failing.json()["error"]["type"] == "server_error"
    assert after.status_code == 200  # the replica went on
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tickets[0].ticket"
    assert big.status_code == 413 and many.status_code == 413
    assert chat.choices[0].message.content == "reply to: refund" and chat.intent == "billing.refund"
    assert streamed == "reply to: login"
    assert health["ray"] is True and health["replicas"] == 2
    assert proc.returncode == 0, stderr[-3000:]
    assert KEY not in stderr


@pytest.mark.slow
def test_predict_on_a_ray_actor_pool_equals_the_plain_path(tiny_run, tmp_path):
    """A CSV with its own id column and other columns, through two actors and through the plain path: the
    same rows, the same answers, every input column kept; JSON output too."""
    proc, _, weights, _, val_rows = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    src = tmp_path / "backlog.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ticket_id", "channel", "body"])
        for n, row in enumerate(val_rows * 3):
            writer.writerow([f"T-{n:03d}", "email, \"web\"", row["ticket"] + ("\nsecond line" if n == 1 else "")])

    def predict(output: Path, *extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "tickettune", "predict", "--weights", str(weights), "--input",
                               str(src), "--text-column", "body", "--id-column", "ticket_id", "--output", str(output),
                               "--chunk-rows", "5", *extra],
                              env=child_env(RAY_USAGE_STATS_ENABLED="0"), capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    predict(tmp_path / "plain.csv")
    predict(tmp_path / "ray.csv", "--ray", "--actors", "2", "--actor-cpus", "0.5")
    predict(tmp_path / "ray.json", "--ray", "--actors", "1")
    plain = list(csv.DictReader((tmp_path / "plain.csv").open(encoding="utf-8")))
    on_ray = list(csv.DictReader((tmp_path / "ray.csv").open(encoding="utf-8")))
    assert len(plain) == len(val_rows) * 3 and plain == on_ray
    assert list(plain[0]) == ["ticket_id", "channel", "body", "predicted_intent", "reply", "confidence"]
    assert plain[1]["body"].endswith("\nsecond line") and plain[0]["channel"] == "email, \"web\""
    assert all(0 < float(r["confidence"]) <= 1 for r in plain)
    results = json.loads((tmp_path / "ray.json").read_text())["predictions"]
    assert [(p["id"], p["predicted_intent"], p["prediction"]) for p in results] == \
        [(r["ticket_id"], r["predicted_intent"], r["reply"]) for r in plain]
