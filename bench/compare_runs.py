"""Two many-desk results (`bench/desks.py --json`) of the same desks under two settings, paired desk by
desk: one method's mean under each and the difference with its 95 % t-interval, per half and over all
desks, split into desks with replies and intent-only desks. How the sentence encoder was decided:

    python bench/compare_runs.py bench/results/desks_fast_mpnet*.json --against bench/results/desks_fast.json

Several files on the left are pooled (each desk once); only desks present on both sides are paired.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from desks import mean_ci

# each metric of the method run.py uses for it: the run's intent ensemble; its composed reply (the CPU default)
METRICS = {"intent": "run", "probes": "run", "intent+probes": "run", "reply": "compose", "must_mention": "compose"}


def by_desk(paths: list[Path]) -> tuple[dict[str, dict], str]:
    """Every desk's results in `paths` (the first file to hold a desk wins), and the encoders they name."""
    desks, encoders = {}, []
    for path in paths:
        saved = json.loads(path.read_text())
        encoders.append(str(saved.get("encoder") or "minilm"))  # the files before the field: minilm
        for r in saved["results"]:
            desks.setdefault(r["desk"], r)
    return desks, "+".join(dict.fromkeys(encoders))


def rows(left: dict, right: dict, method: str | None, keep) -> list[str]:
    """One markdown row per metric with values on both sides: left, right, left - right (95 % CI), of
    `method` (None: each metric's own, `METRICS`)."""
    names = [d for d in left if d in right and keep(left[d])]
    out = []
    for metric, own in METRICS.items():
        method_ = method or own
        pairs = [(left[d]["methods"][method_].get(metric), right[d]["methods"][method_].get(metric)) for d in names
                 if method_ in left[d]["methods"] and method_ in right[d]["methods"]]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None and a == a and b == b]  # no NaN
        if pairs:
            a, b = zip(*pairs)
            out.append("| {} ({}) | {} | {:.3f} | {:.3f} | {:+.3f} ({:+.3f}, {:+.3f}) |".format(
                metric, method_, len(pairs), mean_ci(a)[0], mean_ci(b)[0], *mean_ci([x - y for x, y in pairs])))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("left", nargs="+", type=Path, help="results under the setting measured")
    p.add_argument("--against", nargs="+", type=Path, required=True, help="results of the same desks, the other setting")
    p.add_argument("--method", default=None, help="the method compared (default: run.py's for each metric: "
                   "`run` for intent, `compose` for replies)")
    args = p.parse_args()
    left, lname = by_desk(args.left)
    right, rname = by_desk(args.against)
    for half in ("choose", "report", None):
        for family, replies in (("desks with replies", True), ("intent-only desks", False)):
            def keep(r, half=half, replies=replies):
                return r["replies"] == replies and (half is None or r["half"] == half)

            table = rows(left, right, args.method, keep)
            if table:
                print(f"\n### {half or 'all'} desks, {family}: {lname} vs {rname}\n")
                print(f"| metric | desks | {lname} | {rname} | {lname} - {rname} (95 % CI) |\n| --- | ---: | ---: | ---: | --- |")
                print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
