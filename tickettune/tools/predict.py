"""`tickettune predict`: classify and answer new tickets with a model that run.py saved, no retraining.

    tickettune predict --weights runs/weights --input new.jsonl --output new_results.json
    tickettune predict --weights runs/weights --input export.csv --text-column body --id-column ticket_id \\
        --output export_triaged.csv
    tickettune predict --weights runs/weights --input backlog.csv --output triaged.csv --ray --actors 2

A `.json` output is run.py's results schema (its `training` block is the saved run's); on the weights of
a run.py run, `predicted_intent` and `prediction` equal run.py's for the same tickets. A `.csv` output keeps
every column of the input and adds `predicted_intent`, `reply` and `confidence`, predicted and written
`--chunk-rows` rows at a time (a backlog never sits in memory; the file appears, whole, at the end).
`--ray` runs the model over the file with Ray Data: an actor pool, each actor one loaded model
(`tools/ray_batch.py`). Exit 2, before any model loads, for input it cannot use (every problem, file:line)
or a weights folder that is missing, incomplete or from an incompatible version.
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
    parser.add_argument("--output", required=True,
                        help="results: .json (run.py's schema) or .csv (the input's columns + predicted_intent, "
                             "reply, confidence); written atomically")
    parser.add_argument("--text-column", default="ticket", help="the ticket's column or field (default: ticket)")
    parser.add_argument("--id-column", default="id",
                        help="the id's column or field (default: id; a CSV without it numbers its rows row_N)")
    parser.add_argument("--chunk-rows", type=int, default=256, help="CSV output: rows predicted at a time (default 256)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: a GPU when there is one")
    parser.add_argument("--diagnostics", metavar="FILE", help="also write per-row scores and reply actions (JSONL)")
    ray = parser.add_argument_group("Ray Data (pip install 'ray[data]')")
    ray.add_argument("--ray", action="store_true", help="predict with a Ray Data actor pool (one model per actor)")
    ray.add_argument("--actors", type=int, default=2, help="actors in the pool (default 2)")
    ray.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs each actor reserves (default 1)")
    parser.add_argument("-v", "--verbose", action="store_true")


def main(args: argparse.Namespace) -> int:
    from tickettune.pipeline import runlog
    from tickettune.pipeline.weights_folder import WeightsError, read_metadata

    runlog.setup(args.verbose)
    clock = runlog.Clock()
    problems, rows = check_input(args)
    try:
        read_metadata(Path(args.weights))
    except WeightsError as exc:
        problems.append(str(exc))
    problems += [f"--{flag} {path}: {why}" for flag, path in (("output", args.output), ("diagnostics", args.diagnostics))
                 if path and (why := unwritable(Path(path)))]
    problems += [f"--{flag} {value}: must be >= {low}" for flag, value, low in (
        ("chunk-rows", args.chunk_rows, 1), ("actors", args.actors, 1), ("actor-cpus", args.actor_cpus, 0.01))
        if not value >= low]
    if args.ray and args.diagnostics:
        problems.append("--diagnostics: not with --ray (the actors keep theirs)")
    if problems:
        log.error("cannot start:\n%s", "\n".join(problems))
        return EXIT_BAD_INPUT
    log.info("%d tickets from %s", rows, args.input)
    if args.ray:
        from tickettune.tools.ray_batch import predict_with_ray

        with clock.stage("predict (ray)"):
            written = predict_with_ray(args)
    else:
        written = predict_here(args, clock)
        if written is None:
            return EXIT_BAD_INPUT
    log.info("wrote %d predictions to %s in %.1f s (%s)", written, args.output, clock.elapsed(),
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.stages.items()))
    return 0


def check_input(args: argparse.Namespace) -> tuple[list[str], int]:
    """Every problem of the input file (streamed: nothing kept but the ids), and its row count."""
    from tickettune.pipeline.data import DataError, scan_tickets

    problems, rows = [], 0
    try:
        for problem, _, _ in scan_tickets(args.input, args.text_column, args.id_column):
            if problem is None:
                rows += 1
            else:
                problems.append(problem)
    except DataError as exc:
        problems += exc.problems
    return problems, rows


def predict_here(args: argparse.Namespace, clock) -> int | None:
    from tickettune.pipeline.data import load_tickets
    from tickettune.pipeline.results import TrainingStats, write_jsonl, write_results
    from tickettune.pipeline.ticket_model import TicketModel
    from tickettune.pipeline.weights_folder import WeightsError

    with clock.stage("load model"):
        try:
            model = TicketModel.load(args.weights, device=args.device)
        except WeightsError as exc:  # e.g. a device that is not here
            log.error("cannot load %s: %s", args.weights, exc)
            return None
    log.info("model: %s, %d intents, trained %s", model.plan.describe(), len(model.labels),
             "for %d steps" % model.training.steps if model.training else "(no training record)")
    if args.output.lower().endswith(".csv"):
        with clock.stage("predict"):
            return predict_to_csv(model, args)
    tickets = load_tickets(args.input, args.text_column, args.id_column)
    with clock.stage("predict"):
        predictions, diagnostics = model.predict(tickets)
    stats = model.training or TrainingStats(0, float("nan"), float("nan"), float("nan"))
    write_results(args.output, stats, predictions)
    if args.diagnostics:
        write_jsonl(args.diagnostics, diagnostics)
    return len(predictions)


def predict_to_csv(model, args: argparse.Namespace) -> int:
    """The input's rows with the model's answer, `--chunk-rows` at a time, into the CSV `--output`."""
    from tickettune.pipeline.data import scan_tickets
    from tickettune.pipeline.results import write_jsonl
    from tickettune.tools.csv_out import CsvOut

    diagnostics_all = [] if args.diagnostics else None
    with CsvOut(Path(args.output)) as out:
        chunk = []
        for _, ticket, row in scan_tickets(args.input, args.text_column, args.id_column):
            chunk.append((ticket, row))
            if len(chunk) == args.chunk_rows:
                _predict_chunk(model, chunk, out, diagnostics_all)
                chunk = []
        if chunk:
            _predict_chunk(model, chunk, out, diagnostics_all)
    if diagnostics_all is not None:
        write_jsonl(args.diagnostics, diagnostics_all)
    return out.rows


def _predict_chunk(model, chunk: list, out, diagnostics_all: list | None) -> None:
    from tickettune.tools.csv_out import confidence

    predictions, diagnostics = model.predict([t for t, _ in chunk])
    for (_, row), p, d in zip(chunk, predictions, diagnostics):
        out.write(row, p.predicted_intent, p.prediction, confidence(d, p.predicted_intent))
    if diagnostics_all is not None:
        diagnostics_all += diagnostics


def unwritable(path: Path) -> str | None:
    """Why an output file cannot be written at `path`, or None (its folder is created)."""
    from tickettune.pipeline.results import folder_problem

    return "is a folder, expected a file path" if path.is_dir() else folder_problem(path.parent)
