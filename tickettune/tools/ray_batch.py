"""`tickettune predict --ray`: a backlog through Ray Data, an actor pool in which each actor holds one model.

The file is read by Ray Data in blocks (CSV: pyarrow, every column a string, quoted newlines allowed; JSONL:
one line per row, parsed by the actor as `tickettune predict` parses it), each block goes to an actor of the
pool (`map_batches` with `concurrency=N`: the model loads once per actor, not per batch), and the driver
writes the answered rows to the output in input order (`preserve_order`) as they arrive: the backlog never
sits in memory. The input was checked by `predict.check_input` before Ray starts, so a row the actor sees is
a row the plain path would predict; for a model that composes its replies the predictions are the plain
path's, row for row (tests/test_ray.py). A local Ray runtime is started with `--actors x --actor-cpus` CPUs
plus one for reading, a 200 MB object store and no dashboard (`TICKETTUNE_RAY_ADDRESS` joins a cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tickettune.tools.ray_runtime import start_ray

log = logging.getLogger("tickettune")
ANSWER_COLUMNS = ("predicted_intent", "reply", "confidence", "latency_ms", "tokens_used")


class TicketActor:
    """One loaded model; called with a batch of rows (numpy columns), returns them with the answers."""

    def __init__(self, weights: str, device: str | None, text_column: str, id_column: str, jsonl: bool) -> None:
        from tickettune.pipeline.ticket_model import TicketModel

        self.model = TicketModel.load(weights, device=device)
        self.text_column, self.id_column, self.jsonl = text_column, id_column, jsonl

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from tickettune.pipeline.data import Ticket
        from tickettune.tools.csv_out import confidence

        if self.jsonl:
            rows = [json.loads(line) for line in batch["text"]]
            tickets = [Ticket(r[self.id_column], r[self.text_column]) for r in rows]
        else:
            ids = batch[self.id_column] if self.id_column in batch else [f"r{i}" for i in range(len(batch[self.text_column]))]
            tickets = [Ticket(str(i), str(t)) for i, t in zip(ids, batch[self.text_column])]
        predictions, diagnostics = self.model.predict(tickets)
        out = dict(batch)
        out["predicted_intent"] = np.array([p.predicted_intent for p in predictions], dtype=object)
        out["reply"] = np.array([p.prediction for p in predictions], dtype=object)
        out["confidence"] = np.array([confidence(d, p.predicted_intent) for p, d in zip(predictions, diagnostics)])
        out["latency_ms"] = np.array([p.latency_ms for p in predictions])
        out["tokens_used"] = np.array([p.tokens_used for p in predictions])
        return out


def dataset(args: argparse.Namespace, jsonl: bool):
    """The input as a Ray dataset (CSV cells all strings, as the plain path reads them)."""
    import ray

    if jsonl:
        return ray.data.read_text(args.input, drop_empty_lines=True)
    import pyarrow as pa
    from pyarrow import csv

    from tickettune.pipeline.data import scan_tickets

    first = next(iter(scan_tickets(args.input, args.text_column, args.id_column)), (None, None, None))[2] or {}
    return ray.data.read_csv(args.input, parse_options=csv.ParseOptions(newlines_in_values=True),
                             convert_options=csv.ConvertOptions(column_types={c: pa.string() for c in first},
                                                                strings_can_be_null=False,
                                                                quoted_strings_can_be_null=False))


def predict_with_ray(args: argparse.Namespace) -> int:
    """Predict every row of `args.input` on an actor pool; write `args.output` (CSV or run.py's JSON)."""
    import ray

    from tickettune.pipeline.data import is_csv
    from tickettune.pipeline.results import Prediction, TrainingStats, write_results
    from tickettune.pipeline.weights_folder import read_metadata, stats_from_record
    from tickettune.tools.csv_out import CsvOut

    jsonl = not is_csv(args.input)
    start_ray(args.actors * args.actor_cpus + 1)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    answered = dataset(args, jsonl).map_batches(
        TicketActor, fn_constructor_args=(str(args.weights), args.device, args.text_column, args.id_column, jsonl),
        batch_size=args.chunk_rows, concurrency=args.actors, num_cpus=args.actor_cpus, batch_format="numpy")
    to_csv, predictions, n = args.output.lower().endswith(".csv"), [], 0
    with CsvOut(Path(args.output)) if to_csv else _Nothing() as out:
        for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["reply"])):
                n += 1
                row = json.loads(batch["text"][i]) if jsonl else \
                    {k: str(v[i]) for k, v in batch.items() if k not in ANSWER_COLUMNS}
                ticket_id = row.get(args.id_column, f"row_{n}")
                if to_csv:
                    out.write(row, str(batch["predicted_intent"][i]), str(batch["reply"][i]),
                              float(batch["confidence"][i]))
                else:
                    predictions.append(Prediction(ticket_id, str(batch["reply"][i]), str(batch["predicted_intent"][i]),
                                                  int(batch["latency_ms"][i]), int(batch["tokens_used"][i])))
    if not to_csv:
        meta = read_metadata(Path(args.weights))
        stats = stats_from_record(meta.get("training")) or TrainingStats(0, float("nan"), float("nan"), float("nan"))
        write_results(args.output, stats, predictions)
    return n


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None
