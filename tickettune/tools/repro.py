"""`tickettune repro -- CMD`: run a training job twice and check its predictions are byte-identical.

Owns the rerun and the comparison. The second run gets its `--output` and `--weights` rewritten to
sibling paths (`results.repro-<hex>.json`, `weights.repro-<hex>`) so the runs never overwrite
each other; they are deleted afterwards unless `--keep`. Compared: each prediction as
`json.dumps(sort_keys=True)` without `latency_ms` (a timing), and the sha256 of
`adapter_model.safetensors` when a weights folder holds one. It does not set PYTHONHASHSEED or any
other source of determinism itself: `--seed N` rewrites the command's own `--seed` (if it has one)
and exports TICKETTUNE_SEED=N to both runs, so a job that is only reproducible by luck is caught.

    $ tickettune repro --seed 0 -- python run.py --train t.jsonl --val v.jsonl --output out/results.json --weights out/w
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tickettune.pipeline.data import TicketId

ADAPTER_FILE = "adapter_model.safetensors"
TIMING_FIELDS = ("latency_ms",)


# --- pure ---------------------------------------------------------------------------------------

def flag_value(command: list[str], flag: str) -> str | None:
    """The value of `flag` in `command` (`--flag V` or `--flag=V`); the last one wins, like argparse."""
    value = None
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def with_flag(command: list[str], flag: str, value: str) -> list[str]:
    """`command` with every value of `flag` replaced by `value` (both spellings)."""
    out = list(command)
    for i, arg in enumerate(out):
        if arg == flag and i + 1 < len(out):
            out[i + 1] = value
        elif arg.startswith(flag + "="):
            out[i] = f"{flag}={value}"
    return out


def sibling(path: str, token: str) -> str:
    """`out/results.json` -> `out/results.repro-<token>.json`; `out/weights` -> `out/weights.repro-<token>`."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.repro-{token}{p.suffix}" if p.suffix else f"{p.name}.repro-{token}"))


def canonical_predictions(results: dict) -> list[tuple[TicketId, str]]:
    """(id, canonical JSON) per prediction in file order, timings removed."""
    out = []
    for p in results.get("predictions", []) if isinstance(results, dict) else []:
        if isinstance(p, dict):
            kept = {k: v for k, v in p.items() if k not in TIMING_FIELDS}
            out.append((p.get("id"), json.dumps(kept, sort_keys=True, ensure_ascii=False)))
        else:
            out.append((None, json.dumps(p, sort_keys=True)))
    return out


def differing_ids(first: dict, second: dict) -> list[TicketId]:
    """Ids whose canonical prediction differs, or that only one run predicted, in first-seen order."""
    a, b = canonical_predictions(first), canonical_predictions(second)
    da, db = dict(a), dict(b)
    ids = list(dict.fromkeys([i for i, _ in a] + [i for i, _ in b]))
    return [i for i in ids if da.get(i) != db.get(i)]


# --- running ------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_once(command: list[str], env: dict[str, str], label: str) -> tuple[int, float]:
    """Run the job with its stdout sent to our stderr (our stdout stays clean for --json)."""
    _log(f"repro: {label}: {' '.join(command)}")
    t0 = time.perf_counter()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    try:
        if fd is not None:
            proc = subprocess.run(command, env=env, stdout=fd, stderr=fd)
        else:  # stderr is not a real file (e.g. captured in tests): collect and relay
            proc = subprocess.run(command, env=env, capture_output=True, text=True, errors="replace")
            sys.stderr.write(proc.stdout + proc.stderr)
    except OSError as exc:
        _log(f"repro: {label}: cannot start: {exc}")
        return 127, time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    _log(f"repro: {label}: exit {proc.returncode} ({seconds:.1f}s)")
    return proc.returncode, seconds


def _read_results(path: str) -> dict | None:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, help="seed for both runs (rewrites the command's --seed, "
                                                 "exports TICKETTUNE_SEED)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the second run's output and weights")
    parser.add_argument("job", nargs=argparse.REMAINDER,  # not "command": cli.py uses that dest
                        help="-- then the job, e.g. python run.py ... --output OUT [--weights DIR]")


def _finish(report: dict, as_json: bool, code: int) -> int:
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return code


def main(args: argparse.Namespace) -> int:
    """Exit 0: identical; 1: predictions or adapter differ; 2: a run failed or wrote no results."""
    command = list(args.job)
    if command[:1] == ["--"]:
        command = command[1:]
    output = flag_value(command, "--output")
    report: dict = {"identical": False, "command": command, "seed": args.seed}
    if not command or output is None:
        report["error"] = "usage: tickettune repro [--seed N] -- CMD ... --output OUT [--weights DIR]"
        _log(f"repro: {report['error']}")
        return _finish(report, args.json, 2)

    env = dict(os.environ)
    first_cmd = command
    if args.seed is not None:
        env["TICKETTUNE_SEED"] = str(args.seed)
        if flag_value(command, "--seed") is not None:
            first_cmd = with_flag(command, "--seed", str(args.seed))
    token = secrets.token_hex(4)
    weights = flag_value(command, "--weights")
    second_output = sibling(output, token)
    second_weights = sibling(weights, token) if weights else None
    second_cmd = with_flag(first_cmd, "--output", second_output)
    if weights:
        second_cmd = with_flag(second_cmd, "--weights", second_weights)

    try:
        runs = []
        for label, cmd in (("run 1", first_cmd), ("run 2", second_cmd)):
            code, seconds = run_once(cmd, env, label)
            runs.append({"command": cmd, "returncode": code, "seconds": round(seconds, 2)})
            if code != 0:
                report.update(runs=runs, error=f"{label} failed with exit {code}")
                _log(f"repro: {report['error']}")
                return _finish(report, args.json, 2)
        report["runs"] = runs
        first, second = _read_results(output), _read_results(second_output)
        if first is None or second is None:
            report["error"] = f"no readable results at {output if first is None else second_output}"
            _log(f"repro: {report['error']}")
            return _finish(report, args.json, 2)

        report.update(_compare(first, second, weights, second_weights))
    finally:
        if not args.keep:
            Path(second_output).unlink(missing_ok=True)
            if second_weights:
                shutil.rmtree(second_weights, ignore_errors=True)

    if not args.json:
        _print_verdict(report)
        if args.keep:
            print(f"second run kept at {second_output}" + (f" and {second_weights}" if second_weights else ""))
        print("result: IDENTICAL" if report["identical"] else "result: NOT reproducible")
    return _finish(report, args.json, 0 if report["identical"] else 1)


def _compare(first: dict, second: dict, weights: str | None, second_weights: str | None) -> dict:
    """The report's verdict on two runs' results (and, with `weights`, their adapter files)."""
    differing = differing_ids(first, second)
    same_bytes = canonical_predictions(first) == canonical_predictions(second)
    adapter = {"first": None, "second": None, "identical": None}
    if weights:
        adapter["first"] = file_sha256(Path(weights) / ADAPTER_FILE)
        adapter["second"] = file_sha256(Path(second_weights) / ADAPTER_FILE)
        if adapter["first"] or adapter["second"]:
            adapter["identical"] = adapter["first"] == adapter["second"]
    identical = same_bytes and adapter["identical"] is not False
    return dict(identical=identical, predictions_identical=same_bytes, differing_ids=differing,
                order_identical=[i for i, _ in canonical_predictions(first)]
                == [i for i, _ in canonical_predictions(second)],
                predictions=len(canonical_predictions(first)), adapter=adapter)


def _print_verdict(report: dict) -> None:
    """The predictions' and the adapter's verdicts, one line each."""
    n, differing, adapter = report["predictions"], report["differing_ids"], report["adapter"]
    if report["predictions_identical"]:
        print(f"predictions: identical ({n} predictions, latency_ms ignored)")
    else:
        ids = ", ".join(str(i) for i in differing) or "(same predictions, different order)"
        print(f"predictions: DIFFER for {len(differing)} of {n} ids: {ids}")
    if adapter["identical"] is None:
        print(f"adapter: no {ADAPTER_FILE} to compare")
    else:
        verdict = "identical" if adapter["identical"] else "DIFFER"
        print(f"adapter: {ADAPTER_FILE} {verdict} ({adapter['first']} vs {adapter['second']})")
