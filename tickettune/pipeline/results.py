"""The results file: one `Prediction` per val id, training stats, written atomically.

Does not decide anything about a prediction; it only shapes, checks and writes them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tickettune.pipeline.data import TicketId


@dataclass(frozen=True)
class Prediction:
    id: TicketId
    prediction: str
    predicted_intent: str
    latency_ms: int
    tokens_used: int


@dataclass(frozen=True)
class TrainingStats:
    steps: int
    train_loss: float
    val_loss: float
    wall_clock_s: float


def finite(x: float, default: float = 0.0) -> float:
    """The grader reads plain JSON numbers: NaN/Infinity become `default`, floats are rounded."""
    x = float(x)
    return round(x, 4) if math.isfinite(x) else default


def results_dict(stats: TrainingStats, predictions: list[Prediction]) -> dict:
    training = {
        "steps": int(stats.steps),
        "train_loss": finite(stats.train_loss),
        "val_loss": finite(stats.val_loss),
        "wall_clock_s": finite(stats.wall_clock_s),
    }
    return {"training": training, "predictions": [asdict(p) for p in predictions]}


def folder_problem(folder: str | Path) -> str | None:
    """Why output files cannot be written into `folder` (created when missing), or None."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tickettune-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"not writable ({exc.strerror or exc})"
    return None


def _write_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder + fsync + rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: object) -> None:
    _write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically like the results file."""
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))


def write_results(path: str | Path, stats: TrainingStats, predictions: list[Prediction]) -> None:
    ids = [p.id for p in predictions]
    if len(set(ids)) != len(ids):  # an invariant, not user error: fail before writing anything
        raise AssertionError("duplicated prediction ids")
    write_json_atomic(path, results_dict(stats, predictions))
