#!/usr/bin/env python
"""Load benchmark of `tickettune serve` on the real model: latency and throughput at 1 and 16 clients.

    python bench/serve_load.py --weights runs/weights                 # a folder run.py wrote
    python bench/serve_load.py                                        # trains a tiny one first (~2 min)
    python bench/serve_load.py --weights W --clients 1,4 --requests 8 --single-requests 4   # smoke test

Starts `tickettune serve` as its own process on 127.0.0.1 (a free port; nothing else is ever a
target), waits for /healthz, sends one warm-up request, then for each client count sends a bounded
number of POST /v1/tickets requests (one sample val ticket each, the sample cycled), each client
sending its next request when its last is answered, and stops issuing after --seconds per phase.
Prints a table: p50/p95 latency, requests/s and the server's mean batch size, then the ratio of
requests/s against one client at a time and, on the tickets answered both alone (1 client: batches
of one, which equal `tickettune predict`) and under batching, the share of identical intents and
replies. Exits 1 when a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "northstar"
TINY = {"train": {"epochs": 1, "max_steps": 2, "batch_size": 8}, "infer": {"max_new_tokens": 12}}


@dataclass
class Phase:
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    answers: dict[int, dict] = field(default_factory=dict)   # request number -> prediction
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    batches: int = 0
    tickets: int = 0

    @property
    def done(self) -> int:
        return len(self.latencies_ms)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny(folder: Path) -> Path:
    """A real weights folder from the sample: run.py with a few training steps and 12-token replies."""
    (folder / "tiny.json").write_text(json.dumps(TINY))
    val = folder / "val.jsonl"
    val.write_text("".join(SAMPLE.joinpath("val.jsonl").read_text().splitlines(keepends=True)[:1]))
    weights = folder / "weights"
    print(f"training a tiny model into {weights} (run.py, {TINY}) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, str(ROOT / "run.py"), "--train", str(SAMPLE / "train.jsonl"), "--val", str(val),
                    "--weights", str(weights), "--output", str(folder / "results.json"),
                    "--config", str(folder / "tiny.json")], check=True, cwd=ROOT, env=child_env())
    return weights


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TICKETTUNE_API_KEY"}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "PASSIVE")}


async def run_phase(url: str, tickets: list[dict], clients: int, requests: int, seconds: float,
                    per_request: int = 1) -> Phase:
    import httpx

    phase = Phase(clients)
    before = (await health(url))
    counter = iter(range(requests))
    stop_at = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        for n in counter:
            if time.monotonic() > stop_at:
                return
            rows = [{**tickets[(n * per_request + j) % len(tickets)], "id": f"{n}-{j}"} for j in range(per_request)]
            t0 = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/tickets", json={"tickets": rows})
            except httpx.HTTPError as exc:
                phase.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                phase.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            phase.latencies_ms.append((time.perf_counter() - t0) * 1000)
            phase.answers[n] = response.json()["predictions"][0]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=max(seconds, 60) * 2, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    phase.wall_s = time.perf_counter() - t0
    after = await health(url)
    if "batches" in after:  # (Ray Serve batches in its replicas: no count at the ingress)
        phase.batches, phase.tickets = after["batches"] - before["batches"], after["tickets"] - before["tickets"]
    return phase


async def health(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(f"{url}/healthz")).json()


def start_server(weights: str, port: int, max_batch: int, max_wait_ms: float, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tickettune", "serve", "--weights", weights, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", "256",
           *extra]
    print("server:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env())


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


def table(phases: list[Phase]) -> str:
    lines = ["| clients | requests | p50 ms | p95 ms | requests/s | mean batch |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in phases:
        rps = p.done / p.wall_s if p.wall_s else 0.0
        batch = p.tickets / p.batches if p.batches else float("nan")
        lines.append(f"| {p.clients} | {p.done} | {statistics.median(p.latencies_ms) if p.latencies_ms else float('nan'):.0f} "
                     f"| {percentile(p.latencies_ms, 95):.0f} | {rps:.2f} | {batch:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="weights folder written by run.py (default: train a tiny one in a temp folder)")
    ap.add_argument("--clients", default="1,16", help="client counts, comma-separated (default 1,16)")
    ap.add_argument("--requests", type=int, default=48, help="requests per phase with several clients (default 48)")
    ap.add_argument("--single-requests", type=int, default=12, help="requests with one client (default 12)")
    ap.add_argument("--seconds", type=float, default=300, help="stop issuing requests after this per phase (default 300)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16, its default)")
    ap.add_argument("--max-wait-ms", type=float, default=50, help="the server's --max-wait-ms (default 50, its default)")
    ap.add_argument("--tickets-per-request", type=int, default=1, help="tickets in each request (default 1)")
    ap.add_argument("--ray", action="store_true", help="serve on Ray Serve (`serve --ray`)")
    ap.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas (default 1)")
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs per replica (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    extra = ["--ray", "--replicas", str(args.replicas), "--replica-cpus", str(args.replica_cpus)] if args.ray else []
    clients = [int(c) for c in args.clients.split(",")]
    tickets = [json.loads(line) for line in (SAMPLE / "val.jsonl").read_text().splitlines() if line.strip()]

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        weights = args.weights or str(train_tiny(Path(tmp)))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(weights, port, args.max_batch, args.max_wait_ms, extra)
        try:
            wait_healthy(url, proc)
            asyncio.run(run_phase(url, tickets, 1, 1, args.seconds, args.tickets_per_request))  # warm-up, not counted
            phases = [asyncio.run(run_phase(url, tickets, c, args.single_requests if c == 1 else args.requests,
                                            args.seconds, args.tickets_per_request)) for c in clients]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\n`tickettune serve --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g}{' ' if extra else ''}"
          f"{' '.join(extra)}` on {os.cpu_count()} "
          f"CPU cores, weights {weights if args.weights else '(tiny, trained by the bench)'}, "
          f"{args.tickets_per_request} sample ticket(s) per request\n")
    print(table(phases))
    result = {"phases": [{"clients": p.clients, "requests": p.done, "errors": len(p.errors),
                          "p50_ms": statistics.median(p.latencies_ms) if p.latencies_ms else None,
                          "p95_ms": percentile(p.latencies_ms, 95) if p.latencies_ms else None,
                          "requests_per_s": p.done / p.wall_s if p.wall_s else None,
                          "mean_batch": p.tickets / p.batches if p.batches else None} for p in phases]}
    single = next((p for p in phases if p.clients == 1), None)
    for p in phases:
        if p is single or single is None:
            continue
        ratio = (p.done / p.wall_s) / (single.done / single.wall_s) if single.done and p.done else float("nan")
        common = sorted(set(single.answers) & set(p.answers))
        intents = sum(single.answers[n]["predicted_intent"] == p.answers[n]["predicted_intent"] for n in common)
        replies = sum(single.answers[n]["prediction"] == p.answers[n]["prediction"] for n in common)
        share = replies / len(common) if common else float("nan")
        print(f"\n{p.clients} clients: {ratio:.2f}x the requests/s of one at a time; on the {len(common)} tickets "
              f"answered both ways, intents identical {intents}/{len(common)}, replies identical {replies}/{len(common)} "
              f"({share:.0%})")
        result |= {f"speedup_{p.clients}": ratio, f"identical_intents_{p.clients}": [intents, len(common)],
                   f"identical_replies_{p.clients}": [replies, len(common)]}
    errors = [e for p in phases for e in p.errors]
    for e in errors[:10]:
        print("error:", e, file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
