"""`tickettune package`: build the submission zip from the working tree and validate it like the grader.

Owns which files ship (an allow-list), the refusal of hidden-answer files (a deny check that does not
trust the allow-list), the byte-identical zip, and the grader's submission rules checked from the
zip alone. It does not install or run anything from the zip (tests/test_package.py does, end to end),
does not check that `requirements.txt` resolves, and does not look inside code: a Python file that
hard-codes answers is not detected, nor is anything inside a nested archive.

    $ tickettune package --out dist/repo.zip          # build from ., validate, write atomically
    $ tickettune package --check dist/repo.zip        # validate an existing zip only

Exit status: 0 when the zip passes every rule, 2 when any rule fails (all failures are listed; a
failing build writes nothing).

The deny check (`deny_reasons`) refuses a file when either
  * a path component matches a hidden-answer name: *label*, *answer*, *gold*, *ground_truth* (also
    with '-' or no separator), *_labels.jsonl. This is deliberately blunt: it refuses a module named
    `labels.py` too; rename such a file rather than weaken the rule;
  * its rows carry answer fields. Rows are read from .jsonl (one object a line), .json (any object
    anywhere in the document) and .csv/.tsv (the header). Grader-only fields (`must_mention`,
    `must_not_mention`) are refused in every file. Label fields (`intent`, `ideal_reply`) are allowed
    only in a file named exactly `train.jsonl`: the labelled training input, which the grader hands to
    every run anyway. A val file, or labels saved under any other name, is refused.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath

# --- what ships -----------------------------------------------------------------------------------
ROOT_FILES = frozenset({"run.py", "README.md", "requirements.txt", "constraints.txt", "pyproject.toml",
                        "LICENSE", "LICENSE.md", "LICENSE.txt"})
EXTRA_FILES = frozenset({"scripts/setup.sh"})     # the README's set-up command
PACKAGE_DIR = "tickettune"                        # tickettune/**/*.py, and the page's .html/.js
PACKAGE_SUFFIXES = (".py", ".html", ".js")
DOCS_DIR = "docs"                                 # docs/*.md: the README's links
SAMPLE_DATA = frozenset({"train.jsonl", "val.jsonl"})  # data/<set>/{train,val}.jsonl: tiny sample inputs

# --- what never ships (independent of the allow-list) ----------------------------------------------
HIDDEN_NAME_PATTERNS = ("*label*", "*answer*", "*gold*", "*ground_truth*", "*ground-truth*",
                        "*groundtruth*", "*_labels.jsonl")
GRADER_FIELDS = frozenset({"must_mention", "must_not_mention"})  # never in anything we are given
LABEL_FIELDS = frozenset({"intent", "ideal_reply"})              # only in the labelled train file
TRAIN_FILE = "train.jsonl"
CONTENT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")          # files whose rows are read for fields

# --- the grader's rules ---------------------------------------------------------------------------
MAX_ZIP_BYTES = 20_000_000  # "Size <= 20MB": the smaller reading of MB (10^6), so both readings pass
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold: no clock in the bytes
FILE_MODE = 0o100644              # regular file, rw-r--r--: no umask or checkout mode in the bytes
WALK_SKIP_DIRS = frozenset({"__pycache__", "node_modules"})  # plus every dot-folder (.git, .venv, ...)


# --- selection (pure) -----------------------------------------------------------------------------
def is_allowed(path: str) -> bool:
    """True for a POSIX path (relative to the repo root) that belongs in the submission.

    >>> [is_allowed(p) for p in ("run.py", "tickettune/x/y.py", "data/northstar/val_labels.jsonl", "docs/design.md")]
    [True, True, False, True]
    """
    if path in EXTRA_FILES:
        return True
    parts = PurePosixPath(path).parts
    if len(parts) == 1:
        return parts[0] in ROOT_FILES
    if parts[0] == DOCS_DIR:  # the README links them
        return len(parts) == 2 and parts[1].endswith(".md")
    if parts[0] == PACKAGE_DIR:
        return parts[-1].endswith(PACKAGE_SUFFIXES) and "__pycache__" not in parts
    return len(parts) == 3 and parts[0] == "data" and parts[2] in SAMPLE_DATA


def select_files(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split candidate paths into (kept, left_out), both sorted and without duplicates."""
    unique = sorted(set(paths))
    return [p for p in unique if is_allowed(p)], [p for p in unique if not is_allowed(p)]


# --- deny check (pure) ----------------------------------------------------------------------------
def _rows(path: str, content: bytes) -> Iterator[dict]:
    """The objects a data file holds; unreadable parts yield nothing (they cannot hold fields)."""
    suffix = PurePosixPath(path).suffix.lower()
    text = content.decode("utf-8", errors="replace")
    if suffix == ".jsonl":
        for line in text.splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj
    elif suffix == ".json":
        try:
            stack = [json.loads(text)]
        except json.JSONDecodeError:
            return
        while stack:  # every object anywhere in the document
            obj = stack.pop()
            if isinstance(obj, dict):
                yield obj
                stack.extend(obj.values())
            elif isinstance(obj, list):
                stack.extend(obj)
    elif suffix in (".csv", ".tsv"):  # the header names the columns
        header = next(csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","), [])
        yield {name.strip(): None for name in header}


def deny_reasons(path: str, content: bytes) -> list[str]:
    """Why `path` (with these bytes) would leak hidden answers; empty when it is safe to ship.

    >>> deny_reasons("data/x/val.jsonl", b'{"id": 1, "ticket": "t", "intent": "a"}')
    ["rows carry 'intent' (only train.jsonl may hold labels)"]
    """
    reasons = []
    for part in PurePosixPath(path).parts:
        for pattern in HIDDEN_NAME_PATTERNS:
            if fnmatch.fnmatch(part.lower(), pattern):
                reasons.append(f"name {part!r} matches {pattern!r}")
                break
    keys: set[str] = set()
    for row in _rows(path, content):
        keys.update(str(k) for k in row)
    is_train = PurePosixPath(path).name == TRAIN_FILE
    if keys & GRADER_FIELDS:
        fields = ", ".join(repr(k) for k in sorted(keys & GRADER_FIELDS))
        reasons.append(f"rows carry {fields} (grader-only fields)")
    if not is_train and keys & LABEL_FIELDS:
        fields = ", ".join(repr(k) for k in sorted(keys & LABEL_FIELDS))
        reasons.append(f"rows carry {fields} (only {TRAIN_FILE} may hold labels)")
    return reasons


# --- the zip (pure) -------------------------------------------------------------------------------
def build_zip(files: Mapping[str, bytes]) -> bytes:
    """A deflated zip of `files` (POSIX path -> bytes), byte-identical for the same mapping.

    Names are sorted; every entry gets the same date, mode and creator, and no directory entries,
    so neither the clock, the umask nor the filesystem order reaches the bytes.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so that external_attr carries the mode
            info.external_attr = FILE_MODE << 16
            zf.writestr(info, files[name], compresslevel=9)
    return buffer.getvalue()


def run_root(names: Iterable[str]) -> str | None:
    """The folder holding run.py as the grader finds it: "" (root), "dir/" (the single top-level
    folder), or None when run.py is neither at the root nor inside exactly one top-level folder."""
    names = set(names)
    if "run.py" in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and f"{next(iter(tops))}/run.py" in names:
        return f"{next(iter(tops))}/"
    return None


def validate_zip(data: bytes, filename: str, max_bytes: int = MAX_ZIP_BYTES) -> list[str]:
    """Every submission rule `data` (the archive named `filename`) fails; empty when it passes.

    Checked from the archive alone, as the grader sees it: a .zip that opens and reads back
    cleanly; run.py at the root or inside exactly one top-level folder; README.md next to it;
    at most `max_bytes`; no hidden evaluation files (`deny_reasons` on every member).
    """
    problems = []
    if not filename.lower().endswith(".zip"):
        problems.append(f"zip: {filename!r} does not end in .zip (the grader takes .zip archives only)")
    if len(data) > max_bytes:
        problems.append(f"size: {len(data):,} bytes is over the {max_bytes:,}-byte limit")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        return problems + [f"zip: not a zip archive ({exc})"]
    with zf:
        members = [i for i in zf.infolist() if not i.is_dir()]
        names = [i.filename for i in members]
        if not names:
            problems.append("zip: the archive holds no files")
        unsafe = [n for n in names if n.startswith("/") or "\\" in n or ".." in n.split("/")]
        if unsafe:
            problems.append(f"zip: unsafe member paths {unsafe}")
        try:
            corrupt = zf.testzip()
        except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as exc:
            corrupt = f"({exc})"
        if corrupt:
            problems.append(f"zip: member {corrupt} does not read back (corrupt archive)")
        root = run_root(names)
        if root is None:
            found = sorted(n for n in names if n.rsplit("/", 1)[-1] == "run.py")
            problems.append("run.py: not at the root or directly inside one top-level folder"
                            + (f" (found {', '.join(found)})" if found else " (no run.py in the archive)"))
        # without run.py, README.md may still sit where run.py should: the root or the one top folder
        tops = {n.split("/", 1)[0] for n in names}
        readme_dirs = [root] if root is not None else [""] + ([f"{tops.pop()}/"] if len(tops) == 1 else [])
        if not any(f"{d}README.md" in names for d in readme_dirs):
            where = f"next to run.py (expected {root}README.md)" if root is not None else "at the root"
            problems.append(f"README.md: missing {where}")
        hidden = []
        for name in names:
            content = b""  # names are always checked; rows only of data files that read back
            if not corrupt and name.lower().endswith(CONTENT_SUFFIXES):
                try:
                    content = zf.read(name)
                except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError):
                    pass
            reasons = deny_reasons(name, content)
            if reasons:
                hidden.append(f"{name} ({'; '.join(reasons)})")
        if hidden:
            problems.append("hidden evaluation files: " + ", ".join(hidden))
    return problems


def zip_listing(data: bytes) -> list[tuple[str, int, int]]:
    """(name, size, compressed size) of each file in the archive, in archive order."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, i.file_size, i.compress_size) for i in zf.infolist() if not i.is_dir()]


# --- I/O ------------------------------------------------------------------------------------------
def list_candidates(root: Path) -> tuple[list[str], str]:
    """Candidate paths under `root` and where they came from ("git" or "walk").

    In a git checkout: tracked plus untracked-but-not-ignored files (`git ls-files -co
    --exclude-standard`); elsewhere every file, skipping dot-folders and caches.
    """
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                             capture_output=True, check=True, timeout=60).stdout
        paths = [p for p in out.decode("utf-8", errors="surrogateescape").split("\0") if p]
        # ls-files lists tracked files deleted from the working tree: only what exists ships
        return [p for p in paths if (root / p).is_file()], "git"
    except (OSError, subprocess.SubprocessError):
        pass
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in WALK_SKIP_DIRS)
        rel = Path(folder).relative_to(root)
        paths += [(rel / f).as_posix() for f in files if (Path(folder) / f).is_file()]
    return paths, "walk"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder + rename: a reader (or an upload) never sees half a zip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def print_listing(data: bytes) -> None:
    listing = zip_listing(data)
    for name, size, _ in listing:
        print(f"  {size:>10,}  {name}")
    total = sum(size for _, size, _ in listing)
    print(f"  {total:>10,}  total in {len(listing)} files; zip {len(data):,} bytes "
          f"(limit {MAX_ZIP_BYTES:,}), sha256 {hashlib.sha256(data).hexdigest()[:16]}")


def report(label: str, problems: list[str]) -> int:
    if not problems:
        print(f"package: {label} passes every submission rule")
        return 0
    print(f"package: {label} fails {len(problems)} submission rule(s):", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    return 2


def check(path: Path) -> int:
    """Validate an existing archive; 0 when it passes, 2 otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return report(str(path), [f"zip: cannot read {path} ({exc.strerror or exc})"])
    try:
        print(f"package: {path}")
        print_listing(data)
    except (zipfile.BadZipFile, OSError):
        pass  # validate_zip says why
    return report(str(path), validate_zip(data, path.name))


def build(root: Path, out: Path) -> int:
    """Select, read, zip, validate, then write `out` atomically only if every rule passes."""
    if not root.is_dir():
        return report(str(out), [f"root: {root} is not a folder"])
    if not out.name.lower().endswith(".zip"):
        return report(str(out), [f"zip: {out.name!r} does not end in .zip (the grader takes .zip archives only)"])
    candidates, source = list_candidates(root)
    kept, left_out = select_files(candidates)
    files = {p: (root / p).read_bytes() for p in kept}
    data = build_zip(files)
    print(f"package: {len(kept)} files from {root.resolve()} ({source}); "
          f"{len(left_out)} left out (not on the allow-list)")
    print_listing(data)
    problems = validate_zip(data, out.name)
    if problems:
        print(f"package: nothing written to {out}", file=sys.stderr)
        return report(str(out), problems)
    write_bytes_atomic(out, data)
    return report(str(out), [])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("dist/repo.zip"),
                        help="where to write the zip (default: dist/repo.zip)")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the repo to package (default: the current folder)")
    parser.add_argument("--check", type=Path, metavar="PATH.zip",
                        help="only validate an existing zip; build nothing")


def main(args: argparse.Namespace) -> int:
    return check(args.check) if args.check is not None else build(args.root, args.out)
