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
from typing import Any, Iterator

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
    problems: list[str] = []
    rows: list[tuple[int, dict]] = []
    for lineno, obj, problem in scan_jsonl(path, fields):
        if problem is not None:
            problems.append(problem)
        else:
            rows.append((lineno, obj))
    if problems:
        raise DataError(problems)
    return rows


def scan_jsonl(path: str | Path, fields: dict[str, type | tuple[type, ...]],
               id_field: str = "id") -> Iterator[tuple[int, dict | None, str | None]]:
    """`read_jsonl`, streamed: per non-blank line, (line number, object, None) or (line number, None,
    the problem). Only the ids seen are kept in memory (for duplicates)."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError([f"{path}: cannot read file ({exc.strerror or exc})"]) from exc
    first_line_of: dict[TicketId, int] = {}
    with f:
        for lineno, raw_line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw_line.rstrip(b"\n").decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"{where}: not valid UTF-8 (byte {exc.start})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, None, f"{where}: malformed JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(obj, dict):
                yield lineno, None, f"{where}: expected a JSON object, got {_type_name(obj)}"
                continue
            row_ok = True
            for name, kind in fields.items():
                if name not in obj:
                    yield lineno, None, f"{where}: missing field '{name}'"
                    row_ok = False
                elif isinstance(obj[name], bool) or not isinstance(obj[name], kind):
                    want = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
                    yield lineno, None, f"{where}: field '{name}' must be {want}, got {_type_name(obj[name])}"
                    row_ok = False
            if row_ok and id_field in fields:
                if obj[id_field] == "":
                    yield lineno, None, f"{where}: field '{id_field}' is empty"
                    continue
                if obj[id_field] in first_line_of:
                    yield lineno, None, (f"{where}: duplicated id {obj[id_field]!r} (first seen on line "
                                         f"{first_line_of[obj[id_field]]})")
                    continue
                first_line_of[obj[id_field]] = lineno
            if row_ok:
                yield lineno, obj, None


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


def load_tickets(path: str | Path, text_column: str = "ticket", id_column: str = "id") -> list[Ticket]:
    """Tickets to predict, from JSONL (`{<id_column>, <text_column>}` per line, as `load_val`) or CSV (a
    header naming `text_column` and optionally `id_column`; without that column the ids are `row_N`,
    N counting data rows from 1). The format follows the suffix (`.csv`; `.jsonl`/`.json`), else
    the first character (`{` means JSONL). Every problem is reported at once, with file and line.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
    ...     _ = f.write('ticket\\n"Where is my invoice?"\\n')
    >>> load_tickets(f.name)
    [Ticket(id='row_1', ticket='Where is my invoice?')]
    >>> os.unlink(f.name)
    """
    problems, tickets = [], []
    for problem, ticket, _ in scan_tickets(path, text_column, id_column):
        if problem is not None:
            problems.append(problem)
        else:
            tickets.append(ticket)
    if problems:
        raise DataError(problems)
    return tickets


def is_csv(path: str | Path) -> bool:
    """CSV by its suffix (`.csv`), JSONL by its suffix (`.jsonl`/`.json`), else by its first character."""
    path = Path(path)
    suffix = path.suffix.lower()
    return not (suffix in (".jsonl", ".json") or (suffix != ".csv" and _first_char(path) == "{"))


def scan_tickets(path: str | Path, text_column: str = "ticket",
                 id_column: str = "id") -> Iterator[tuple[str | None, Ticket | None, dict | None]]:
    """`load_tickets`, streamed (one row in memory at a time, and the ids seen): per row, (None, ticket,
    the row's fields) or (the problem, None, None). A file that cannot be read at all raises `DataError`."""
    if not is_csv(path):
        for _, obj, problem in scan_jsonl(path, {id_column: ID, text_column: str}, id_field=id_column):
            yield (problem, None, None) if problem is not None else (None, Ticket(obj[id_column], obj[text_column]), obj)
        return
    yield from _scan_csv(Path(path), text_column, id_column)


def _first_char(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return f.read(4096).lstrip()[:1].decode("ascii", "replace")
    except OSError:
        return ""  # read_jsonl / the CSV reader report the unreadable file


def _scan_csv(path: Path, text_column: str, id_column: str) -> Iterator[tuple[str | None, Ticket | None, dict | None]]:
    import csv

    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError([f"{path}: cannot read file ({exc.strerror or exc})"]) from exc
    with f:
        reader = csv.DictReader(_decoded_lines(f))
        try:
            columns = reader.fieldnames or []
        except _BadBytes as exc:
            yield f"{path}:{exc.line}: not valid UTF-8 (byte {exc.byte})", None, None
            return
        if text_column not in columns:
            yield (f"{path}:1: no '{text_column}' column (header: {', '.join(columns) or 'empty'}); "
                   "name the ticket column with --text-column"), None, None
            return
        first_line_of: dict[str, int] = {}
        n = 0
        try:
            for n, row in enumerate(reader, start=1):
                where = f"{path}:{reader.line_num}"
                if None in row:  # more cells than the header has columns
                    yield f"{where}: {len(columns) + len(row[None])} cells, the header has {len(columns)}", None, None
                    continue
                if row[text_column] is None:
                    yield f"{where}: missing field '{text_column}' (fewer cells than the header)", None, None
                    continue
                ticket_id = row[id_column] if id_column in columns else f"row_{n}"
                if not ticket_id:
                    yield f"{where}: field '{id_column}' is empty", None, None
                elif ticket_id in first_line_of:
                    yield (f"{where}: duplicated id {ticket_id!r} (first seen on line {first_line_of[ticket_id]})",
                           None, None)
                else:
                    first_line_of[ticket_id] = reader.line_num
                    yield None, Ticket(ticket_id, row[text_column]), row
        except csv.Error as exc:
            yield f"{path}:{reader.line_num}: malformed CSV ({exc})", None, None
        except _BadBytes as exc:
            yield f"{path}:{exc.line}: not valid UTF-8 (byte {exc.byte})", None, None


class _BadBytes(ValueError):
    def __init__(self, line: int, byte: int) -> None:
        super().__init__(f"line {line}, byte {byte}")
        self.line, self.byte = line, byte


def _decoded_lines(f) -> Iterator[str]:
    """A binary file's lines as text for `csv` (a UTF-8 BOM dropped), one at a time; `_BadBytes` names the
    line and the file's byte offset of the first byte that is not UTF-8."""
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        start = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
        try:
            yield raw[start:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _BadBytes(lineno, offset + start + exc.start) from None
        offset += len(raw)


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
