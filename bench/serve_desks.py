#!/usr/bin/env python
"""Many desks in one process: what an extra loaded desk costs in memory, and what switching desks costs a batch.

    python bench/serve_desks.py --desk north=runs/final/weights --desk quill=runs/quill/weights
    python bench/serve_desks.py --desk a=W --desk b=W --desk c=W      # one folder under three names

Loads the desks one after another through `tickettune serve`'s own table (`serve.desks.Desks`: one copy of
each base model, each desk's adapters, intent encoder and index on top), printing the seconds and the
resident memory each adds; then predicts `--batch` sample tickets per call, `--rounds` times on one desk and
`--rounds` times alternating between desks, and prints the median call of each (the switch is the
difference). A model that generates its replies loads its LM on the first call that needs it: the table
says which desks did.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--desk", action="append", required=True, metavar="NAME=WEIGHTS_DIR")
    ap.add_argument("--batch", type=int, default=4, help="tickets per call (default 4)")
    ap.add_argument("--rounds", type=int, default=6, help="calls per phase (default 6)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from tickettune.pipeline.data import Ticket
    from tickettune.tools.serve.batching import answer
    from tickettune.tools.serve.desks import Desks

    rows = [json.loads(line) for line in (ROOT / "data" / "northstar" / "val.jsonl").read_text().splitlines()]
    tickets = [Ticket(r["id"], r["ticket"]) for r in rows[:args.batch]]
    desks = Desks(max_loaded=len(args.desk))
    names = []
    for flag in args.desk:
        name, _, folder = flag.partition("=")
        desks.add_folder(name, folder)
        names.append(name)
    loads = []
    for name in names:
        before, t0 = rss_mb(), time.perf_counter()
        model = desks.get(name)
        answer(model, tickets)  # the first call: embeds the reply bank, loads the LM where the policy needs it
        loads.append({"desk": name, "load_and_first_call_s": round(time.perf_counter() - t0, 2),
                      "rss_added_mb": round(rss_mb() - before), "lm_loaded": getattr(model, "model", None) is not None})

    def timed(order: list[str]) -> list[float]:
        out = []
        for name in order:
            t0 = time.perf_counter()
            answer(desks.get(name), tickets)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    same = timed([names[0]] * args.rounds)
    alternating = timed([names[i % len(names)] for i in range(args.rounds)])
    print(f"\n{len(names)} desks in one process, {os.cpu_count()} CPU cores, {args.batch} tickets per call\n")
    print("| desk | load + first call s | resident memory added MB | LM loaded |\n| --- | ---: | ---: | --- |")
    for row in loads:
        print(f"| {row['desk']} | {row['load_and_first_call_s']:.2f} | {row['rss_added_mb']} | {row['lm_loaded']} |")
    print(f"\n| calls | median ms | p95 ms |\n| --- | ---: | ---: |\n| same desk | {statistics.median(same):.0f} | "
          f"{sorted(same)[-1]:.0f} |\n| alternating desks | {statistics.median(alternating):.0f} | "
          f"{sorted(alternating)[-1]:.0f} |")
    print(f"\nswitching desks: {statistics.median(alternating) - statistics.median(same):+.0f} ms per call (median)")
    print(f"adapters on the shared bases: {desks.bases.loaded() if desks.bases else {}}")
    if args.json:
        Path(args.json).write_text(json.dumps({"loads": loads, "same_ms": same, "alternating_ms": alternating}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
