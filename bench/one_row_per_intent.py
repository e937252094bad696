#!/usr/bin/env python
"""The intent prior of a desk with ONE train row per intent, where nothing can be held out to argue with it.

    python bench/one_row_per_intent.py --data data/northstar data/northstar-alt data/quillpay bitext --seeds 0 1 2 3 4 5 6 7

For each set (a folder with train/val/val_labels.jsonl, or `bitext`: bench/bitext_sample.py's sample) and
seed, it draws one train row per intent (`random.Random(seed)`, intents in sorted order), builds what
run.py builds from them (the retrieval index with replies and intent names, the fine-tuned intent
encoder, CPU settings, no deadline), and scores every val row with each embedding expert alone and with
the weightings a prior could take: `equal` (every embedding expert at 1: run.py's prior, here and, since
bench/desks.py, on every desk; `intent.prior_weights`) beside the prototypes alone (the earlier prior). The
LM is left out: without held-out rows it gets no weight. Prints a table (mean over seeds), writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import bitext_sample  # noqa: E402
from tickettune.pipeline import intent  # noqa: E402
from tickettune.pipeline.config import RunConfig  # noqa: E402
from tickettune.pipeline.data import load_labels, load_train, load_val  # noqa: E402
from tickettune.pipeline.embeddings import embed  # noqa: E402
from tickettune.pipeline.fit import fit_encoder  # noqa: E402
from tickettune.pipeline.plan import Hardware, decide  # noqa: E402
from tickettune.pipeline.retrieval import RetrievalIndex  # noqa: E402

WEIGHTINGS = {"prototypes": {"proto": 1.0}, "linear head": {"logreg": 1.0}, "encoder": {"encoder": 1.0},
              "encoder + linear head": {"encoder": 1.0, "logreg": 1.0},
              "equal": {"proto": 1.0, "logreg": 1.0, "encoder": 1.0}}


def one_row_each(train: list, seed: int) -> list:
    rng, by = random.Random(seed), {}
    for row in train:
        by.setdefault(row.intent, []).append(row)
    return [rng.choice(by[k]) for k in sorted(by)]


def cell(folder: Path, seed: int, cfg: RunConfig) -> dict:
    train = one_row_each(load_train(folder / "train.jsonl"), seed)
    val, gold_of = load_val(folder / "val.jsonl"), {lab.id: lab.intent for lab in load_labels(folder / "val_labels.jsonl")}
    index = RetrievalIndex.build(train, embed, cfg.encoder.label_names)
    labels = list(index.labels)
    encoder = fit_encoder(index, set(), cfg, decide(Hardware(cuda=False)), None)  # run.py's: nothing held out here
    tickets = [t.ticket for t in val]
    vectors = embed(tickets)
    experts = {"proto": index.intent_logprobs(vectors), "logreg": index.linear_logprobs(vectors),
               "encoder": encoder.logprobs(tickets)}
    gold = np.array([labels.index(gold_of[t.id]) if gold_of[t.id] in labels else -1 for t in val])
    return {name: round(float((intent.combine(experts, w) == gold).mean()), 4) for name, w in WEIGHTINGS.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=[str(ROOT / "data" / "northstar")])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--config", default=None, help="settings JSON as run.py --config (tiny settings for a smoke test)")
    p.add_argument("--json", default=None, help="write {'results': [{set, seed, <weighting>: accuracy}]} here")
    args = p.parse_args()
    cfg = RunConfig.for_plan("cpu", json.loads(Path(args.config).read_text()) if args.config else {})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            folder = bitext_sample.write(Path(tmp) / "bitext") if data == "bitext" else Path(data)
            for seed in args.seeds:
                t0 = time.perf_counter()
                row = {"set": Path(data).name, "seed": seed, **cell(folder, seed, cfg),
                       "seconds": round(time.perf_counter() - t0, 1)}
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    names = list(WEIGHTINGS)
    print("| set | draws | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for s in dict.fromkeys(r["set"] for r in results):
        rows = [r for r in results if r["set"] == s]
        print(f"| {s} | {len(rows)} | " + " | ".join(f"{np.mean([r[n] for r in rows]):.3f}" for n in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
