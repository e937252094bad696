"""Answered rows as CSV: the input's columns kept, the model's answer added; written whole or not at all.

Shared by `tickettune predict` (chunks on this process) and `predict --ray` (batches from the actor pool).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("tickettune")
ADDED_COLUMNS = ("predicted_intent", "reply", "confidence")


def confidence(diagnostics: dict, intent: str) -> float:
    return float((diagnostics.get("intent_probs") or {}).get(intent, 0.0))


class CsvOut:
    """A CSV written beside its final name and renamed into place when closed without error. Its columns:
    the first row's fields (a CSV's header; a JSONL row's keys), then `ADDED_COLUMNS` (an input column of
    the same name is replaced, with a warning). Values that are not strings are written as JSON."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self._file = self._writer = None

    def __enter__(self) -> "CsvOut":
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", dir=self.path.parent,
                                                 prefix=f".{self.path.name}.", suffix=".tmp", delete=False)
        return self

    def write(self, row: dict, intent: str, reply: str, conf: float) -> None:
        import csv
        import json

        if self._writer is None:
            clash = [c for c in ADDED_COLUMNS if c in row]
            if clash:
                log.warning("the input has column(s) %s: replaced by the model's", ", ".join(clash))
            columns = [c for c in row if c not in ADDED_COLUMNS] + list(ADDED_COLUMNS)
            self._writer = csv.DictWriter(self._file, columns, extrasaction="ignore")
            self._writer.writeheader()
        cells = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in row.items()}
        self._writer.writerow({**cells, "predicted_intent": intent, "reply": reply, "confidence": f"{conf:.4f}"})
        self.rows += 1

    def __exit__(self, kind, value, traceback) -> None:
        import os

        if self._writer is None and kind is None:  # no rows: the added columns alone
            import csv

            csv.writer(self._file).writerow(ADDED_COLUMNS)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if kind is None:
            os.replace(self._file.name, self.path)
        else:
            os.unlink(self._file.name)
