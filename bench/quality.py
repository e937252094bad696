#!/usr/bin/env python
"""Quality benchmark: tickettune's default against retrieval baselines, scored by `tickettune eval`'s rules.

    python bench/quality.py                                   # the project's sample set
    python bench/quality.py --data data/northstar data/northstar-alt bitext   # leave-one-set-out table
    python bench/quality.py --train T --val V --labels L --config tiny.json --limit-val 6   # CI slice

`bitext` is the 30/50 sample that bench/bitext_sample.py builds from ../shared/datasets/bitext-12
(third-party, built on demand into a temporary folder). The validation protocol: every choice in
the method was made on one set and is reported on the others untouched (README, "Measured").

Rows of the table:
  knn-copy         all-MiniLM-L6-v2 nearest train ticket: its intent, its reply copied
  finetune-copy    tickettune's intent, reply = nearest train reply of that intent copied
  tickettune       the default run.py (intent ensemble, grounded generated reply)
  intent: X only   each expert of tickettune's intent ensemble alone (encoder, frozen prototypes, frozen
                   linear head, LM),
                   from its diagnostics; the LM's only where the run scored labels (weight > 0)
Replies are judged offline (MiniLM cosine to the ideal reply, the proxy judge), so it needs no key.
Wall-clock is the whole run.py process; peak RSS is the child process's maximum resident set.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import bitext_sample  # noqa: E402  (bench/, beside this file)
from tickettune.pipeline.data import load_labels, load_train, load_val  # noqa: E402
from tickettune.tools.evaluate import score  # noqa: E402
from tickettune.tools.results_file import parse_results  # noqa: E402
from tickettune.tools.judge import offline_scores  # noqa: E402

COLUMNS = ("intent", "probes", "must-mention", "must-not", "reply sim", "reply", "composite", "wall s", "peak MB")


def evaluate(labels, results: dict) -> dict:
    parsed = parse_results(results, [lab.id for lab in labels])
    replies = [parsed.predictions.get(lab.id, {}).get("prediction") or "" for lab in labels]
    ev = score(labels, parsed, offline_scores([(lab.ideal_reply, r) for lab, r in zip(labels, replies)]))
    return {"intent": ev.intent_accuracy, "probes": ev.probe_accuracy, "must-mention": ev.must_mention_rate,
            "must-not": ev.must_not_mention_rate, "reply sim": ev.reply_similarity, "reply": ev.reply_score,
            "composite": ev.composite}


def results_file(ids, intents, replies, wall_s: float) -> dict:
    preds = [{"id": i, "prediction": r, "predicted_intent": p, "latency_ms": 0, "tokens_used": 0}
             for i, p, r in zip(ids, intents, replies)]
    return {"training": {"steps": 0, "train_loss": 0.0, "val_loss": 0.0, "wall_clock_s": wall_s}, "predictions": preds}


def knn_copy(train, val) -> tuple[dict, float]:
    from tickettune.pipeline.embeddings import embed

    t0 = time.perf_counter()
    sims = embed([v.ticket for v in val]) @ embed([t.ticket for t in train]).T   # (V, T)
    nearest = sims.argmax(1)
    wall = time.perf_counter() - t0
    return results_file([v.id for v in val], [train[j].intent for j in nearest],
                        [train[j].ideal_reply for j in nearest], wall), wall


def run_tickettune(train_path, val_path, config: str | None, workdir: Path) -> tuple[dict, Path, float, float]:
    weights, out = workdir / "weights", workdir / "results.json"
    cmd = [sys.executable, str(ROOT / "run.py"), "--train", str(train_path), "--val", str(val_path),
           "--weights", str(weights), "--output", str(out)] + (["--config", config] if config else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stages = [line.split("INFO", 1)[1].strip() for line in proc.stderr.splitlines() if " s  (total " in line]
    print("\n".join(f"  {s}" for s in stages), file=sys.stderr)
    return json.loads(out.read_text()), weights, wall, peak_mb


def variants_from_diagnostics(train, val, results: dict, weights: Path) -> dict[str, dict]:
    """finetune-copy and the single-expert intents, derived from tickettune's own run."""
    from tickettune.pipeline.embeddings import embed
    from tickettune.pipeline.retrieval import RetrievalIndex

    diag = [json.loads(line) for line in (weights / "diagnostics.jsonl").read_text().splitlines()]
    by_id = {d["id"]: d for d in diag}
    index = RetrievalIndex.fit(train, embed([t.ticket for t in train]), embed([t.ideal_reply for t in train]))
    vectors = embed([v.ticket for v in val])
    ids = [v.id for v in val]
    tt = {p["id"]: p for p in results["predictions"]}
    wall = results["training"]["wall_clock_s"]
    ft_intents = [tt[i]["predicted_intent"] for i in ids]
    copy = [train[index.nearest(vec, intent, 1)[0]].ideal_reply for vec, intent in zip(vectors, ft_intents)]
    replies = [tt[i]["prediction"] for i in ids]
    out = {"finetune-copy": results_file(ids, ft_intents, copy, wall)}
    for expert in ("encoder", "proto", "logreg", "lm"):  # the LM's only where it scored labels (weight > 0)
        key = f"{expert}_logp"
        if all(key in by_id[i] for i in ids):
            alone = [max(by_id[i][key], key=lambda lab, s=by_id[i][key]: -1e18 if s[lab] is None else s[lab])
                     for i in ids]
            out[f"intent: {expert} only"] = results_file(ids, alone, replies, wall)
    return out


def fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and v <= 1.0 else f"{v:.0f}")


def bench_set(name: str, train_path: Path, val_path: Path, labels_path: Path, args, work: Path) -> dict:
    """The table rows of one set: the baselines and tickettune, each scored by the grader's rules."""
    train, val, labels = load_train(train_path), load_val(val_path), load_labels(labels_path)
    work.mkdir(parents=True, exist_ok=True)
    if args.limit_val:
        val, labels = val[:args.limit_val], labels[:args.limit_val]
        val_path = work / "val.jsonl"
        val_path.write_text("".join(json.dumps({"id": v.id, "ticket": v.ticket}) + "\n" for v in val))
    table: dict[str, dict] = {}
    knn, knn_wall = knn_copy(train, val)
    table["knn-copy"] = evaluate(labels, knn) | {"wall s": knn_wall, "peak MB": None}
    results, weights, wall, peak = run_tickettune(train_path, val_path, args.config, work)
    for approach, res in variants_from_diagnostics(train, val, results, weights).items():
        table[approach] = evaluate(labels, res) | {"wall s": wall, "peak MB": peak}
    table["tickettune"] = evaluate(labels, results) | {"wall s": wall, "peak MB": peak}
    policy = json.loads((weights / "tickettune.json").read_text()).get("reply_policy", {})
    print(f"\n{name}: {len(train)} train, {len(val)} val, {sum(lab.probe for lab in labels)} probes; "
          f"reply policy {policy.get('source')} (+{policy.get('extra_sentences')} sentences), evidence "
          f"{json.dumps({k: v for k, v in policy.get('evidence', {}).items() if k != 'heldout_pairs'})}",
          file=sys.stderr)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=[str(ROOT / "data" / "northstar")],
                   help="folders with train/val/val_labels.jsonl, or `bitext` (the built Bitext sample)")
    p.add_argument("--train", type=Path)
    p.add_argument("--val", type=Path)
    p.add_argument("--labels", type=Path)
    p.add_argument("--config", help="run.py --config file (e.g. tiny settings for CI)")
    p.add_argument("--limit-val", type=int, default=0, help="only the first N val rows")
    p.add_argument("--json", type=Path, help="also write the tables as JSON here: {set: {approach: row}}")
    p.add_argument("--keep", type=Path, help="keep tickettune's results and weights in this folder")
    args = p.parse_args()
    tables: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.train:
            sets = [(args.train.parent.name, args.train, args.val, args.labels)]
        else:
            sets = []
            for data in args.data:
                folder = bitext_sample.write(Path(tmp) / "bitext") if data == "bitext" else Path(data)
                sets.append((folder.name, folder / "train.jsonl", folder / "val.jsonl", folder / "val_labels.jsonl"))
        for name, train_path, val_path, labels_path in sets:
            tables[name] = bench_set(name, train_path, val_path, labels_path, args,
                                     (args.keep or Path(tmp) / "runs") / name)
    print("\nreplies judged by the offline proxy (MiniLM cosine); reply = the grader's reply score\n")
    print("| set | approach | " + " | ".join(COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 2) + "|")
    for name, table in tables.items():
        for approach, row in table.items():
            print(f"| {name} | {approach} | " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |")
        gain = table["tickettune"]["reply"] - table["finetune-copy"]["reply"]
        print(f"| {name} | reply gain over copying | {gain:+.3f} |" + " |" * (len(COLUMNS) - 1))
    if args.json:
        args.json.write_text(json.dumps(tables, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
