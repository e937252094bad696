#!/usr/bin/env python
"""Cost curve: run.py from 30 to 3,000 train rows and 50 to 500 val rows, seconds per stage.

    python bench/scale.py                                       # {30, 300, 3000} x {50, 500}, --budget-s 1500
    python bench/scale.py --train-rows 120 --val-rows 200 --budget-s 300 --source bitext   # one cell
    python bench/scale.py --train-rows 30 --val-rows 10 --budget-s 200 --config tiny.json  # CI smoke

Data (third-party, built on demand, never committed): `banking77` (default): train rows drawn
evenly over Banking77's 77 intents from its train.csv (`random.Random(0)`, intents round robin),
val rows from its test.csv among the intents that train has, in the same way; every train row gets
the reply of one Bitext-12 row chosen per intent (Banking77 has no replies; these give the reply
adapter real lengths and one consistent reply per intent, which is what costs time). `bitext`:
Bitext-12's own tickets and replies (12 intents, 1,961 rows: train and val drawn without overlap).

Per cell: wall-clock of the whole process, run.py's stage lines, optimiser steps, the budget plan's
reason, peak RSS (the child's VmHWM, polled), intent accuracy and the embedding expert's accuracy
alone on the same val rows. Prints a table; `--json` keeps it; `--plot PNG` draws seconds per stage
against train rows, one line per stage and one panel per val-row count.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
STAGES = ("embed", "load model", "train", "save model", "predict")


def _round_robin(by_label: dict[str, list[str]], n: int, rng: random.Random, labels: list[str]) -> list[tuple[str, str]]:
    """`n` (text, label) pairs, one label at a time in `labels` order, each label's rows shuffled."""
    pools = {lab: rng.sample(by_label[lab], len(by_label[lab])) for lab in labels}
    out: list[tuple[str, str]] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools.values()):
        for lab in labels:
            if depth < len(pools[lab]) and len(out) < n:
                out.append((pools[lab][depth], lab))
        depth += 1
    return out


def build(source: str, n_train: int, n_val: int, out: Path) -> tuple[Path, Path, dict]:
    """train.jsonl and val.jsonl in `out`; returns their paths and the gold intent per val id."""
    rng = random.Random(0)
    bitext = [json.loads(line) for line in (SHARED / "bitext-12" / "rows.jsonl").read_text().splitlines() if line]
    if source == "bitext":
        by = defaultdict(list)
        for r in bitext:
            by[r["intent"]].append(r["ticket"])
        labels = sorted(by)
        pairs = _round_robin(by, n_train + n_val, rng, labels)
        reply_of = {r["ticket"]: r["ideal_reply"] for r in bitext}
        train = [(t, lab, reply_of[t]) for t, lab in pairs[:n_train]]
        val = [(t, lab) for t, lab in pairs[n_train:]]
    else:
        def read(name):
            by = defaultdict(list)
            with open(SHARED / "banking77" / name, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    by[row["category"]].append(row["text"])
            return by
        train_by, test_by = read("train.csv"), read("test.csv")
        labels = sorted(train_by)
        replies = {lab: bitext[(i * 97) % len(bitext)]["ideal_reply"] for i, lab in enumerate(labels)}
        train = [(t, lab, replies[lab]) for t, lab in _round_robin(train_by, n_train, rng, labels)]
        seen = sorted({lab for _, lab, _ in train})
        val = _round_robin(test_by, n_val, rng, seen)
    out.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out / "train.jsonl", out / "val.jsonl"
    train_path.write_text("".join(json.dumps({"id": f"t{i}", "ticket": t, "intent": lab, "ideal_reply": r}) + "\n"
                                  for i, (t, lab, r) in enumerate(train)), encoding="utf-8")
    val_path.write_text("".join(json.dumps({"id": f"v{i}", "ticket": t}) + "\n" for i, (t, _) in enumerate(val)),
                        encoding="utf-8")
    return train_path, val_path, {f"v{i}": lab for i, (_, lab) in enumerate(val)}


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_cell(train_path: Path, val_path: Path, gold: dict, budget_s: float, config: str | None, work: Path) -> dict:
    out, weights = work / "results.json", work / "weights"
    cmd = [sys.executable, str(ROOT / "run.py"), "--train", str(train_path), "--val", str(val_path), "--weights",
           str(weights), "--output", str(out), "--budget-s", str(budget_s)] + (["--config", config] if config else [])
    t0 = time.perf_counter()
    with open(work / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid))
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    text = (work / "run.log").read_text(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"run.py failed ({proc.returncode}):\n{text[-4000:]}")
    stages = {}
    for line in text.splitlines():
        for stage in STAGES:
            marker = f"INFO    {stage} "
            if marker in line and " s  (total " in line:
                stages[stage] = float(line.split(marker, 1)[1].split(" s  (total")[0])
    budget_line = next((line.split("budget: ", 1)[1] for line in text.splitlines() if "budget: " in line), "")
    results = json.loads(out.read_text())
    preds = {p["id"]: p["predicted_intent"] for p in results["predictions"]}
    diag = [json.loads(line) for line in (weights / "diagnostics.jsonl").read_text().splitlines() if line]
    expert = "encoder_logp" if all("encoder_logp" in d for d in diag) else "proto_logp"
    emb = {d["id"]: max(d[expert], key=d[expert].get) for d in diag}
    meta = json.loads((weights / "tickettune.json").read_text())
    return {"wall_s": round(wall, 1), "stages_s": stages, "steps": results["training"]["steps"],
            "peak_mb": round(peak), "intent": sum(preds[i] == g for i, g in gold.items()) / len(gold),
            "embedding_expert": sum(emb.get(i) == g for i, g in gold.items()) / len(gold),
            "budget": meta.get("budget", {}), "budget_log": budget_line,
            "reply_policy": meta.get("reply_policy", {}).get("source")}


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = sorted({c["val_rows"] for c in cells})
    fig, axes = plt.subplots(1, len(vals), figsize=(6 * len(vals), 4.2), squeeze=False)
    for ax, n_val in zip(axes[0], vals):
        row = sorted((c for c in cells if c["val_rows"] == n_val), key=lambda c: c["train_rows"])
        xs = [c["train_rows"] for c in row]
        for stage in STAGES + ("wall",):
            ys = [c["wall_s"] if stage == "wall" else c["stages_s"].get(stage, 0.0) for c in row]
            ax.plot(xs, ys, marker="o", label=stage, linestyle="--" if stage == "wall" else "-")
        ax.set_xscale("log")
        ax.set_xlabel("train rows")
        ax.set_ylabel("seconds")
        ax.set_title(f"{n_val} val rows (budget {row[0]['budget_s']:.0f} s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("run.py cost per stage, 2-core CPU, bundled SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-rows", type=int, nargs="+", default=[30, 300, 3000])
    p.add_argument("--val-rows", type=int, nargs="+", default=[50, 500])
    p.add_argument("--budget-s", type=float, default=1500.0)
    p.add_argument("--source", choices=("banking77", "bitext"), default="banking77")
    p.add_argument("--config", help="run.py --config (tiny settings for a smoke test)")
    p.add_argument("--json", type=Path, help="write the cells here")
    p.add_argument("--plot", type=Path, help="write the cost plot here (PNG)")
    p.add_argument("--keep", type=Path, help="keep each cell's data, log, results and weights here")
    args = p.parse_args()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for n_val in args.val_rows:
            for n_train in args.train_rows:
                work = base / f"{args.source}-{n_train}x{n_val}"
                train_path, val_path, gold = build(args.source, n_train, n_val, work / "data")
                cell = {"source": args.source, "train_rows": n_train, "val_rows": n_val, "budget_s": args.budget_s}
                cell |= run_cell(train_path, val_path, gold, args.budget_s, args.config, work)
                cells.append(cell)
                print(f"{n_train} x {n_val}: {cell['wall_s']} s, {cell['steps']} steps, intent {cell['intent']:.3f}",
                      file=sys.stderr)
    print(f"\n{args.source}, --budget-s {args.budget_s:.0f}; seconds per stage from run.py's log\n")
    print("| train rows | val rows | wall s | " + " | ".join(STAGES) + " | steps | rows trained | peak MB "
          "| intent | embedding expert | replies |")
    print("| --- " * (len(STAGES) + 10) + "|")
    for c in cells:
        print(f"| {c['train_rows']} | {c['val_rows']} | {c['wall_s']:.0f} | "
              + " | ".join(f"{c['stages_s'].get(s, 0.0):.0f}" for s in STAGES)
              + f" | {c['steps']} | {c['budget'].get('rows', '-')} | {c['peak_mb']} | {c['intent']:.3f} "
              f"| {c['embedding_expert']:.3f} | {c['reply_policy']} |")
    for c in cells:
        print(f"- {c['train_rows']} x {c['val_rows']}: {c['budget_log']}")
    if args.json:
        args.json.write_text(json.dumps(cells, indent=2))
    if args.plot:
        plot(cells, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
