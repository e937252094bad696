"""`tickettune predict`: classify and answer new tickets with a model that run.py saved, no retraining.

    tickettune predict --weights runs/weights --input new.jsonl --output new_results.json
    tickettune predict --weights runs/weights --input export.csv --text-column body --output out.json

Writes run.py's results schema; its `training` block is the saved run's. On the weights of a run.py
run, `predicted_intent` and `prediction` equal run.py's for the same tickets. Exit 2, before any
model loads, for input it cannot use (file:line: problem) or a weights folder that is missing,
incomplete or from an incompatible version (what is missing, which version).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("tickettune")
EXIT_BAD_INPUT = 2


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="weights folder written by run.py")
    parser.add_argument("--input", required=True,
                        help="tickets: JSONL ({\"id\", \"ticket\"}) or CSV (a ticket column, optional id column)")
    parser.add_argument("--output", required=True, help="results JSON file (written atomically)")
    parser.add_argument("--text-column", default="ticket", help="the ticket's column or field (default: ticket)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: a GPU when there is one")
    parser.add_argument("--diagnostics", metavar="FILE", help="also write per-row scores and reply actions (JSONL)")
    parser.add_argument("-v", "--verbose", action="store_true")


def main(args: argparse.Namespace) -> int:
    from tickettune.pipeline import runlog
    from tickettune.pipeline.data import DataError, load_tickets
    from tickettune.pipeline.weights_folder import WeightsError, read_metadata

    runlog.setup(args.verbose)
    clock = runlog.Clock()
    problems = []
    try:
        tickets = load_tickets(args.input, args.text_column)
    except DataError as exc:
        problems += exc.problems
    try:
        read_metadata(Path(args.weights))
    except WeightsError as exc:
        problems.append(str(exc))
    problems += [f"--{flag} {path}: {why}" for flag, path in (("output", args.output), ("diagnostics", args.diagnostics))
                 if path and (why := unwritable(Path(path)))]
    if problems:
        log.error("cannot start:\n%s", "\n".join(problems))
        return EXIT_BAD_INPUT
    log.info("%d tickets from %s", len(tickets), args.input)

    from tickettune.pipeline.results import TrainingStats, write_jsonl, write_results
    from tickettune.pipeline.ticket_model import TicketModel

    with clock.stage("load model"):
        try:
            model = TicketModel.load(args.weights, device=args.device)
        except WeightsError as exc:  # e.g. a device that is not here
            log.error("cannot load %s: %s", args.weights, exc)
            return EXIT_BAD_INPUT
    log.info("model: %s, %d intents, trained %s", model.plan.describe(), len(model.labels),
             "for %d steps" % model.training.steps if model.training else "(no training record)")
    with clock.stage("predict"):
        predictions, diagnostics = model.predict(tickets)
    stats = model.training or TrainingStats(0, float("nan"), float("nan"), float("nan"))
    write_results(args.output, stats, predictions)
    if args.diagnostics:
        write_jsonl(args.diagnostics, diagnostics)
    log.info("wrote %d predictions to %s in %.1f s (%s)", len(predictions), args.output, clock.elapsed(),
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.stages.items()))
    return 0


def unwritable(path: Path) -> str | None:
    """Why an output file cannot be written at `path`, or None (its folder is created)."""
    from tickettune.pipeline.results import folder_problem

    return "is a folder, expected a file path" if path.is_dir() else folder_problem(path.parent)
