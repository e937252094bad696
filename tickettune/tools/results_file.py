"""A results file, read leniently: every problem collected, never raised (`evaluate` scores what
could be used; `grade` prints the problems).

The schema: an object with a `training` block (`TRAINING_FIELDS`, finite non-negative numbers,
`steps` an integer) and a `predictions` list of objects, one per label id (`id`, a non-empty
string or integer, and `PREDICTION_FIELDS`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tickettune.pipeline.data import TicketId

TRAINING_FIELDS = ("steps", "train_loss", "val_loss", "wall_clock_s")
# field -> (accepted types, description); bool is rejected everywhere even though it is an int
PREDICTION_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "prediction": ((str,), "a string"),
    "predicted_intent": ((str,), "a string"),
    "latency_ms": ((int, float), "a number"),
    "tokens_used": ((int,), "an integer"),
}

@dataclass(frozen=True)
class ParsedResults:
    """What could be used from a results file: valid training numbers, first prediction per id."""

    training: dict[str, float]
    predictions: dict[TicketId, dict]
    problems: list[str]


def kind_of(value: Any) -> str:
    """A JSON value's kind, for problems: 'null', 'str', 'list', ..."""
    return "null" if value is None else type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_results(obj: Any, label_ids: list[TicketId]) -> ParsedResults:
    """Check a decoded results object against the schema and the label ids, never raising."""
    problems: list[str] = []
    if not isinstance(obj, dict):
        problems.append(f"results: expected a JSON object, got {kind_of(obj)}")
        obj = {}
    training = _training(obj, problems)
    raw_predictions = obj.get("predictions")
    if "predictions" not in obj:
        problems.append("results: missing 'predictions'")
        raw_predictions = []
    elif not isinstance(raw_predictions, list):
        problems.append(f"results: 'predictions' must be a list, got {kind_of(raw_predictions)}")
        raw_predictions = []
    predictions, first_index = _predictions(raw_predictions, set(label_ids), problems)
    for lid in label_ids:
        if lid not in first_index:
            problems.append(f"missing prediction for id {lid!r}")
    return ParsedResults(training, predictions, problems)


def _training(obj: dict, problems: list[str]) -> dict[str, float]:
    """The valid numbers of the 'training' block; each problem appended to `problems`."""
    training: dict[str, float] = {}
    raw_training = obj.get("training")
    if "training" not in obj:
        problems.append("results: missing 'training'")
    elif not isinstance(raw_training, dict):
        problems.append(f"results: 'training' must be an object, got {kind_of(raw_training)}")
    else:
        for name in TRAINING_FIELDS:
            value = raw_training.get(name)
            if name not in raw_training:
                problems.append(f"training: missing field '{name}'")
            elif not _is_number(value):
                problems.append(f"training: field '{name}' must be a finite number, got {value!r}")
            elif name == "steps" and not isinstance(value, int):
                problems.append(f"training: field 'steps' must be an integer, got {value!r}")
            else:
                if value < 0:
                    problems.append(f"training: field '{name}' is negative ({value!r})")
                training[name] = float(value)
    return training


def _predictions(rows: list, known: set, problems: list[str]) -> tuple[dict[TicketId, dict], dict[TicketId, int]]:
    """The first prediction row per known id, and each id's first position (unknown ids too);
    each problem appended to `problems`."""
    predictions: dict[TicketId, dict] = {}
    first_index: dict[TicketId, int] = {}
    for i, row in enumerate(rows):
        where = f"predictions[{i}]"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object, got {kind_of(row)}")
            continue
        pid = row.get("id")
        if "id" not in row:
            problems.append(f"{where}: missing field 'id'")
            continue
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or pid == "":
            problems.append(f"{where}: field 'id' must be a non-empty string or integer, got {pid!r}")
            continue
        where = f"{where} (id {pid!r})"
        if pid in first_index:
            problems.append(f"{where}: duplicated id (first at predictions[{first_index[pid]}]); "
                            f"only the first is scored")
            continue
        first_index[pid] = i
        if pid not in known:
            problems.append(f"{where}: unknown id (not in the labels)")
            continue
        for name, (types, want) in PREDICTION_FIELDS.items():
            value = row.get(name)
            if name not in row:
                problems.append(f"{where}: missing field '{name}'")
            elif isinstance(value, bool) or not isinstance(value, types) or (
                    isinstance(value, float) and not math.isfinite(value)):
                problems.append(f"{where}: field '{name}' must be {want}, got {kind_of(value)} {value!r}"[:300])
        predictions[pid] = row
    return predictions, first_index


def read_results(path: str | Path) -> tuple[Any, list[str]]:
    """Decode a results file; unreadable or malformed JSON is a problem, not an exception."""
    try:
        return json.loads(Path(path).read_bytes()), []
    except OSError as exc:
        return None, [f"{path}: cannot read file ({exc.strerror or exc})"]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{path}: not valid JSON ({exc})"[:300]]
