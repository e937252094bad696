#!/usr/bin/env python
"""Few-shot intent benchmark: tickettune's intent pipeline against frozen-encoder baselines.

    python bench/fewshot_intent.py --data ../shared/datasets/banking77 --shots 5 10 --seeds 0 1 2 --json out.json
    python bench/fewshot_intent.py --data bitext --shots 5 10 --seeds 0 1 2     # the probe-style check

DIR holds `train.csv` and `test.csv` with the header `text,category` (any taxonomy, any size). For
each seed and k, k train rows per intent are sampled exactly as ../shared/datasets/README.md says
(`rng = random.Random(seed)`; per category in sorted order, `rng.sample(texts of that category in
file order, k)`), and every row of test.csv is scored. Methods:

  minilm-prototype   frozen all-MiniLM-L6-v2, cosine to each intent's normalised mean embedding
  minilm-logreg      frozen all-MiniLM-L6-v2, logistic regression (C=10)
  setfit             SetFit's default recipe on the same MiniLM (bench/setfit_baseline.py), stopped after the
                     seconds tickettune's fit took on the same cell (--budget-s when tickettune is not run)
  tickettune         the intent pipeline run.py runs on the CPU plan, through the library: `fit.fit`
                     (intent encoder, prototypes, the LoRA intent adapter under the run's own budget
                     planner, the held-out calibration) then `TicketModel.predict`. The rows carry no
                     replies, so the reply adapter is off (`train.reply_epochs` 0) and replies are
                     composed; `--budget-s` is the run's budget per fit, as run.py's --budget-s.

`--data bitext` builds a probe-style split of ../shared/datasets/bitext-12 on the fly: train.csv holds
the rows Bitext tagged neither Q (colloquial) nor Z (misspelt), test.csv every Q- or Z-tagged row.

Prints a table (mean over seeds, and per seed) and writes {"results": [{"method", "shots", "seed",
"accuracy", "seconds"}, ...]}. Seconds: fit and prediction of every test row.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import random
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tickettune.pipeline.runlog import set_process_defaults  # noqa: E402

set_process_defaults()
METHODS = ("minilm-prototype", "minilm-logreg", "setfit", "tickettune")


def read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f)]


def bitext_probe_split(out: Path) -> Path:
    """train.csv (plain rows) and test.csv (Q- or Z-tagged rows) of Bitext-12 in `out`."""
    rows = [json.loads(line) for line in (ROOT.parent / "shared" / "datasets" / "bitext-12" / "rows.jsonl")
            .read_text(encoding="utf-8").splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train.csv", lambda r: not set("QZ") & set(r["tags"])), ("test.csv", lambda r: set("QZ") & set(r["tags"]))):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "category"])
            writer.writerows([r["ticket"], r["intent"]] for r in rows if keep(r))
    return out


def sample(rows: list[tuple[str, str]], k: int, seed: int) -> list[tuple[str, str]]:
    """k rows per category, the shared README's rule exactly.

    >>> sample([("a", "x"), ("b", "x"), ("c", "y"), ("d", "y")], 1, 0)
    [('b', 'x'), ('d', 'y')]
    """
    rng = random.Random(seed)
    by: dict[str, list[str]] = defaultdict(list)
    for text, category in rows:
        by[category].append(text)
    return [(text, category) for category in sorted(by) for text in rng.sample(by[category], k)]


def frozen_methods(train: list[tuple[str, str]], test_vectors, embed) -> dict[str, list[str]]:
    """Predictions of the two frozen baselines."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    labels = sorted({c for _, c in train})
    x = embed([t for t, _ in train])
    y = np.array([labels.index(c) for _, c in train])
    protos = np.stack([x[y == i].mean(0) for i in range(len(labels))])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    proto = (test_vectors @ protos.T).argmax(1)
    logreg = LogisticRegression(C=10, max_iter=5000).fit(x, y).predict(test_vectors)
    return {"minilm-prototype": [labels[i] for i in proto], "minilm-logreg": [labels[i] for i in logreg]}


def tickettune_method(train: list[tuple[str, str]], test: list[str], base, tokenizer, plan, seed: int,
                      budget_s: float) -> list[str]:
    """run.py's intent pipeline on the CPU plan, through the library (see the module docstring)."""
    from tickettune.pipeline.config import RunConfig
    from tickettune.pipeline.data import Example, Ticket
    from tickettune.pipeline.embeddings import embed
    from tickettune.pipeline.fit import fit
    from tickettune.pipeline.retrieval import RetrievalIndex

    start = time.monotonic()
    examples = [Example(f"t{i}", text, category, "") for i, (text, category) in enumerate(train)]
    cfg = RunConfig.for_plan(plan.device, {"seed": seed, "budget_s": budget_s, "train": {"reply_epochs": 0},
                                           "infer": {"reply_source": "retrieve"}})
    index = RetrievalIndex.build(examples, embed, cfg.encoder.label_names)
    model = fit(copy.deepcopy(base), tokenizer, plan, cfg, index, val_rows=len(test),
                deadline=start + budget_s)
    predictions, _ = model.predict([Ticket(f"q{i}", text) for i, text in enumerate(test)])
    return [p.predicted_intent for p in predictions]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train.csv and test.csv (text,category), or `bitext`")
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget-s", type=float, default=240.0, help="tickettune's budget per fit, as run.py's")
    p.add_argument("--limit-test", type=int, default=0, help="only N test rows, evenly spread (smoke tests)")
    p.add_argument("--json", type=Path, help="write {\"results\": [...]} here")
    args = p.parse_args()

    from tickettune.pipeline import runlog
    from tickettune.pipeline.embeddings import embed

    minilm_embed = partial(embed, choice="minilm")  # the frozen baselines are MiniLM's, whatever the run's encoder
    runlog.setup(False)
    import tempfile

    data = bitext_probe_split(Path(tempfile.mkdtemp()) / "bitext-probes") if args.data == "bitext" else Path(args.data)
    train_rows, test_rows = read_csv(data / "train.csv"), read_csv(data / "test.csv")
    if args.limit_test:  # spread over the file (which may be sorted by intent)
        test_rows = test_rows[::max(1, len(test_rows) // args.limit_test)][:args.limit_test]
    test_texts, gold = [t for t, _ in test_rows], [c for _, c in test_rows]
    t0 = time.perf_counter()
    test_vectors = minilm_embed(test_texts)
    embed_s = time.perf_counter() - t0
    base = tokenizer = plan = None
    if "tickettune" in args.methods:
        from tickettune.pipeline import modeling
        from tickettune.pipeline.plan import decide, detect_hardware

        os.environ["HF_HUB_OFFLINE"] = "1"
        plan = decide(detect_hardware())
        base, tokenizer = modeling.load_base(plan)
    results = []
    for k in args.shots:
        for seed in args.seeds:
            train = sample(train_rows, k, seed)
            t0 = time.perf_counter()
            frozen = {"minilm-prototype", "minilm-logreg"} & set(args.methods)
            predicted = frozen_methods(train, test_vectors, minilm_embed) if frozen else {}
            seconds = dict.fromkeys(frozen, time.perf_counter() - t0 + embed_s)
            if "tickettune" in args.methods:
                t0 = time.perf_counter()
                predicted["tickettune"] = tickettune_method(train, test_texts, base, tokenizer, plan, seed,
                                                            args.budget_s)
                seconds["tickettune"] = time.perf_counter() - t0
            if "setfit" in args.methods:  # at tickettune's cost on this cell
                from setfit_baseline import setfit_predict

                t0 = time.perf_counter()
                predicted["setfit"] = setfit_predict([t for t, _ in train], [c for _, c in train], test_texts,
                                                     seconds.get("tickettune", args.budget_s), seed)
                seconds["setfit"] = time.perf_counter() - t0
            for method in args.methods:
                accuracy = sum(p == g for p, g in zip(predicted[method], gold)) / len(gold)
                seconds_ = seconds[method]
                results.append({"method": method, "shots": k, "seed": seed, "accuracy": round(accuracy, 4),
                                "seconds": round(seconds_, 1)})
                print(f"{method:17s} {k:>2}-shot seed {seed}: {accuracy:.4f} ({seconds_:.0f} s)", file=sys.stderr)
    print(f"\n{data.name}: {len(test_rows)} test rows; mean over seeds {args.seeds} (per seed)\n")
    print("| method | " + " | ".join(f"{k}-shot" for k in args.shots) + " | seconds per fit |")
    print("| --- " * (len(args.shots) + 2) + "|")
    for method in args.methods:
        cells, secs = [], []
        for k in args.shots:
            rows = [r for r in results if r["method"] == method and r["shots"] == k]
            mean = sum(r["accuracy"] for r in rows) / len(rows)
            per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in rows)
            cells.append(f"{mean:.3f} ({per_seed})")
            secs += [r["seconds"] for r in rows]
        print(f"| {method} | " + " | ".join(cells) + f" | {sum(secs) / len(secs):.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
