"""Ticket files: read and validate JSONL, reporting every problem of a file at once.

Owns the input rows (`Example` for train, `Ticket` for val) and their validation. It does not
handle evaluation labels beyond reading them (`load_labels`); scoring lives in `evaluate`.

    >>> rows = load_train("data/northstar/train.jsonl")   # doctest: +SKIP
    >>> rows[0].intent                                      # doctest: +SKIP
    'billing.seat_question'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TicketId = str | int


class DataError(ValueError):
    """A file could not be used; `problems` names file, line and field of each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Ticket:
    id: TicketId
    ticket: str


@dataclass(frozen=True)
class Example:
    id: TicketId
    ticket: str
    intent: str
    ideal_reply: str


@dataclass(frozen=True)
class Label:
    id: TicketId
    intent: str
    ideal_reply: str
    must_mention: tuple[str, ...] = ()
    must_not_mention: tuple[str, ...] = ()
    probe: bool = False


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def read_jsonl(path: str | Path, fields: dict[str, type | tuple[type, ...]]) -> list[tuple[int, dict]]:
    """Read a JSONL file into `(line_number, object)` pairs, checking required `fields` and ids.

    Blank lines and unknown extra fields are ignored. Every problem in the file (bad UTF-8, bad
    JSON, a missing field, a wrong type, a duplicated id) is collected and raised as one
    `DataError`, so a user fixes the file in one pass.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError([f"{path}: cannot read file ({exc.strerror or exc})"]) from exc
    problems: list[str] = []
    rows: list[tuple[int, dict]] = []
    first_line_of: dict[TicketId, int] = {}
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{where}: not valid UTF-8 (byte {exc.start})")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {_type_name(obj)}")
            continue
        row_ok = True
        for name, kind in fields.items():
            if name not in obj:
                problems.append(f"{where}: missing field '{name}'")
                row_ok = False
            elif isinstance(obj[name], bool) or not isinstance(obj[name], kind):
                want = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
                problems.append(f"{where}: field '{name}' must be {want}, got {_type_name(obj[name])}")
                row_ok = False
        if row_ok and "id" in fields:
            if obj["id"] == "":
                problems.append(f"{where}: field 'id' is empty")
                continue
            if obj["id"] in first_line_of:
                problems.append(f"{where}: duplicated id {obj['id']!r} (first seen on line {first_line_of[obj['id']]})")
                continue
            first_line_of[obj["id"]] = lineno
        if row_ok:
            rows.append((lineno, obj))
    if problems:
        raise DataError(problems)
    return rows


ID = (str, int)


def load_train(path: str | Path) -> list[Example]:
    """Labelled rows: id, ticket, intent, ideal_reply. At least one row; intents non-empty."""
    rows = read_jsonl(path, {"id": ID, "ticket": str, "intent": str, "ideal_reply": str})
    problems = [f"{path}:{n}: field 'intent' is empty" for n, o in rows if not o["intent"].strip()]
    if not rows:
        problems.append(f"{path}: no training rows")
    if problems:
        raise DataError(problems)
    return [Example(o["id"], o["ticket"], o["intent"].strip(), o["ideal_reply"]) for _, o in rows]


def load_val(path: str | Path) -> list[Ticket]:
    """Input rows: id, ticket. May be empty."""
    return [Ticket(o["id"], o["ticket"]) for _, o in read_jsonl(path, {"id": ID, "ticket": str})]


def load_tickets(path: str | Path, text_column: str = "ticket") -> list[Ticket]:
    """Tickets to predict, from JSONL (`{"id", <text_column>}` per line, as `load_val`) or CSV (a
    header naming `text_column` and optionally `id`; without an `id` column the ids are `row_N`,
    N counting data rows from 1). The format follows the suffix (`.csv`; `.jsonl`/`.json`), else
    the first character (`{` means JSONL). Every problem is reported at once, with file and line.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    ...     _ = f.write('ticket\\n"Where is my invoice?"\\n')
    >>> load_tickets(f.name)
    [Ticket(id='row_1', ticket='Where is my invoice?')]
    >>> os.unlink(f.name)
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json") or (suffix != ".csv" and _first_char(path) == "{"):
        return [Ticket(o["id"], o[text_column]) for _, o in read_jsonl(path, {"id": ID, text_column: str})]
    return _load_csv_tickets(path, text_column)


def _first_char(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.read(4096).lstrip()[:1].decode("ascii", "replace")
    except OSError:
        return ""  # read_jsonl / the CSV reader report the unreadable file


def _load_csv_tickets(path: Path, text_column: str) -> list[Ticket]:
    import csv

    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError([f"{path}: cannot read file ({exc.strerror or exc})"]) from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataError([f"{path}:{line}: not valid UTF-8 (byte {exc.start})"]) from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = reader.fieldnames or []
    if text_column not in columns:
        raise DataError([f"{path}:1: no '{text_column}' column (header: {', '.join(columns) or 'empty'}); "
                         "name the ticket column with --text-column"])
    problems: list[str] = []
    tickets: list[Ticket] = []
    first_line_of: dict[str, int] = {}
    try:
        for n, row in enumerate(reader, start=1):
            where = f"{path}:{reader.line_num}"
            if None in row:  # more cells than the header has columns
                problems.append(f"{where}: {len(columns) + len(row[None])} cells, the header has {len(columns)}")
                continue
            if row[text_column] is None:
                problems.append(f"{where}: missing field '{text_column}' (fewer cells than the header)")
                continue
            ticket_id = row["id"] if "id" in columns else f"row_{n}"
            if not ticket_id:
                problems.append(f"{where}: field 'id' is empty")
            elif ticket_id in first_line_of:
                problems.append(f"{where}: duplicated id {ticket_id!r} (first seen on line {first_line_of[ticket_id]})")
            else:
                first_line_of[ticket_id] = reader.line_num
                tickets.append(Ticket(ticket_id, row[text_column]))
    except csv.Error as exc:
        problems.append(f"{path}:{reader.line_num}: malformed CSV ({exc})")
    if problems:
        raise DataError(problems)
    return tickets


def load_labels(path: str | Path) -> list[Label]:
    """Evaluation labels: id, intent, ideal_reply, optional must_mention / must_not_mention / probe."""
    rows = read_jsonl(path, {"id": ID, "intent": str, "ideal_reply": str})
    problems: list[str] = []
    labels = []
    for n, o in rows:
        for key in ("must_mention", "must_not_mention"):
            value = o.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{path}:{n}: field '{key}' must be a list of strings")
        if not isinstance(o.get("probe", False), bool):
            problems.append(f"{path}:{n}: field 'probe' must be true or false")
        if not problems:
            labels.append(Label(o["id"], o["intent"], o["ideal_reply"], tuple(o.get("must_mention", [])),
                                tuple(o.get("must_not_mention", [])), o.get("probe", False)))
    if problems:
        raise DataError(problems)
    return labels


def taxonomy(examples: list[Example]) -> list[str]:
    """The intents seen in train, sorted: the only labels tickettune ever predicts."""
    return sorted({e.intent for e in examples})
