"""`tickettune eval`: grade a results file against labels with the grader's rules (`evaluate`),
replies judged by `judge`, optionally an HTML `report`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tickettune.pipeline.data import DataError, load_labels
from tickettune.tools.evaluate import format_table, load_synonyms, score
from tickettune.tools.results_file import ParsedResults, parse_results, read_results


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, help="results.json written by run.py")
    parser.add_argument("--labels", required=True, help="labels JSONL (id, intent, ideal_reply, ...)")
    parser.add_argument("--synonyms", help="JSON object: label -> list of accepted alternative labels")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--judge-model", default="gpt-4o-mini", help="LLM judge model (default gpt-4o-mini)")
    parser.add_argument("--budget-usd", type=float, default=3.00, help="hard limit on judge spend (default 3.00)")
    parser.add_argument("--judge-cache", default="~/.cache/tickettune/judge", help="judge cache folder")
    parser.add_argument("--offline", action="store_true",
                        help="use the offline judge (MiniLM cosine) even when OPENAI_API_KEY is set")
    parser.add_argument("--report", metavar="DIR", help="write an HTML report (confusion matrix, wrong rows)")
    parser.add_argument("--weights", metavar="DIR", help="weights folder; its loss_history.json goes in the report")
    parser.add_argument("--forgetting", metavar="JSON", help="`tickettune forgetting --json` output: its table goes "
                        "in the report and after the scores")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Exit 0: scored, no problems; 1: scored, with schema problems; 2: labels/synonyms unusable."""
    from tickettune.tools import judge  # the judge pulls in openai / embeddings: import only when scoring

    t0 = time.perf_counter()
    try:
        labels = load_labels(args.labels)
        synonyms = load_synonyms(args.synonyms) if args.synonyms else None
        forgetting = load_forgetting(args.forgetting) if args.forgetting else None
    except DataError as exc:
        _log("eval: cannot use the input:\n" + "\n".join(f"  {p}" for p in exc.problems))
        return 2
    obj, read_problems = read_results(args.results)
    parsed = parse_results(obj, [label.id for label in labels]) if not read_problems else \
        ParsedResults({}, {}, read_problems + [f"missing prediction for id {label.id!r}" for label in labels])
    _log(f"eval: {len(labels)} labels, {len(parsed.predictions)} usable predictions, "
         f"{len(parsed.problems)} problems ({time.perf_counter() - t0:.1f}s)")

    pairs = []
    for label in labels:
        reply = parsed.predictions.get(label.id, {}).get("prediction")
        pairs.append((label.ideal_reply, reply if isinstance(reply, str) else ""))
    t1 = time.perf_counter()
    run = judge.judge_replies(pairs, model=args.judge_model, budget_usd=args.budget_usd,
                              cache_dir=Path(args.judge_cache).expanduser(), offline=args.offline, log=_log)
    _log(f"eval: judged {len(pairs)} replies with {run.name} ({time.perf_counter() - t1:.1f}s)")

    ev = score(labels, parsed, run.scores, synonyms, run.fallback, run.info())
    if args.report:
        from tickettune.tools import report

        page = report.write_report(args.report, ev, labels_path=args.labels, results_path=args.results,
                                   weights_dir=args.weights, forgetting=forgetting)
        _log(f"eval: report written to {page}")
    if args.json:
        print(json.dumps(ev.summary(), indent=2, ensure_ascii=False))
    else:
        print(format_table(ev))
        if forgetting:
            from tickettune.tools.forgetting import format_table as forgetting_table

            print("\ngeneral ability (tickettune forgetting):\n" + forgetting_table(forgetting))
    return 1 if ev.problems else 0


def load_forgetting(path: str | Path) -> dict:
    """The JSON `tickettune forgetting --json` wrote, checked for the fields the report shows."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError([f"{path}: cannot read a forgetting summary ({exc})"]) from exc
    ok = isinstance(obj, dict) and isinstance(obj.get("base"), dict) and isinstance(obj.get("adapters"), dict) and all(
        isinstance(a, dict) and {"acc", "acc_norm", "delta_acc", "ci95"} <= set(a) for a in obj["adapters"].values())
    if not ok or not {"acc", "acc_norm"} <= set(obj["base"]):
        raise DataError([f"{path}: not a `tickettune forgetting --json` summary (base, adapters with acc, "
                         "acc_norm, delta_acc, ci95)"])
    return obj
