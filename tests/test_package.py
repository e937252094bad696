"""tickettune.tools.package: selection, the deny check, a byte-identical zip, the grader's rules, and a clean-unzip run."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tickettune.tools import cli
from tickettune.tools.package import (
    MAX_ZIP_BYTES,
    build_zip,
    deny_reasons,
    list_candidates,
    run_root,
    select_files,
    validate_zip,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROW = {"id": "ex_1", "ticket": "How do I add seats?", "intent": "billing.seat_question", "ideal_reply": "Go to..."}
VAL_ROW = {"id": "val_1", "ticket": "How many guests?"}
LABEL_ROW = {"id": "val_1", "intent": "workspace.guest_access", "ideal_reply": "50.", "must_mention": ["50"],
             "must_not_mention": [], "probe": False}


def jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def make_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A plain zip written with zipfile itself, so the rule tests do not depend on build_zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


GOOD = {"run.py": b"print('hi')\n", "README.md": b"# hi\n", "requirements.txt": b"torch\n",
        "tickettune/__init__.py": b"", "data/northstar/train.jsonl": jsonl(TRAIN_ROW),
        "data/northstar/val.jsonl": jsonl(VAL_ROW)}


# --- selection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, kept", [
    ("run.py", True),
    ("README.md", True),
    ("requirements.txt", True),
    ("pyproject.toml", True),
    ("LICENSE", True),
    ("tickettune/cli.py", True),
    ("tickettune/sub/deep/x.py", True),
    ("data/northstar/train.jsonl", True),
    ("data/northstar/val.jsonl", True),
    ("data/northstar/val_labels.jsonl", False),  # every labels file stays out
    ("data/northstar/FACTS.md", False),
    ("data/train.jsonl", False),                 # sample data sits exactly one folder below data/
    ("data/a/b/train.jsonl", False),
    (".git/config", False),
    (".venv/lib/python3.11/site-packages/x.py", False),
    ("tickettune/__pycache__/cli.cpython-311.pyc", False),
    ("tickettune/__pycache__/stale.py", False),
    ("tickettune/notes.md", False),
    ("tickettune.egg-info/PKG-INFO", False),
    ("tests/test_package.py", False),
    ("dist/repo.zip", False),
    ("weights/adapter_model.safetensors", False),
    ("bench/results.json", False),
    ("scripts/setup.sh", True),
    ("constraints.txt", True),
    ("run.pyc", False),
    ("README.md.orig", False),
])
def test_selection_allow_list(path: str, kept: bool) -> None:
    assert select_files([path]) == (([path], []) if kept else ([], [path]))


def test_selection_is_sorted_and_deduplicated() -> None:
    kept, left_out = select_files(["tickettune/b.py", "run.py", "tickettune/b.py", "x.txt", "README.md", "a.txt"])
    assert kept == ["README.md", "run.py", "tickettune/b.py"]
    assert left_out == ["a.txt", "x.txt"]


def test_candidates_from_git_keep_untracked_and_drop_ignored(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    write_tree(tmp_path, {**GOOD, ".gitignore": b"dist/\n*.pyc\n", "dist/repo.zip": b"old",
                          "tickettune/x.pyc": b"\0", "notes.txt": b"untracked, not ignored"})
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # no commit: ls-files -co still lists
    paths, source = list_candidates(tmp_path)
    assert source == "git"
    assert "notes.txt" in paths and "run.py" in paths
    assert "dist/repo.zip" not in paths and "tickettune/x.pyc" not in paths


def test_candidates_without_git_walk_the_folder_skipping_dot_folders(tmp_path: Path) -> None:
    write_tree(tmp_path, {**GOOD, ".venv/lib/x.py": b"", ".git/HEAD": b"", "tickettune/__pycache__/a.pyc": b""})
    paths, source = list_candidates(tmp_path)
    assert source == "walk"
    assert sorted(paths) == sorted(GOOD)


def test_real_repo_selection_ships_no_hidden_answers() -> None:
    kept, left_out = select_files(list_candidates(REPO)[0])
    assert "tickettune/tools/package.py" in kept
    assert not [p for p in kept if p.startswith(("tests/", "dist/", ".", "bench/"))]
    assert not {p: deny_reasons(p, (REPO / p).read_bytes()) for p in kept if deny_reasons(p, (REPO / p).read_bytes())}
    assert not [p for p in kept if "label" in p]


# --- deny check -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, content, reason", [
    # refused by name, wherever they sit and whatever they hold
    ("data/northstar/val_labels.jsonl", jsonl(LABEL_ROW), "matches '*label*'"),
    ("val_labels.jsonl", b"", "matches '*label*'"),
    ("answers.txt", b"", "matches '*answer*'"),
    ("GROUND_TRUTH.csv", b"", "matches '*ground_truth*'"),
    ("data/gold/val.jsonl", jsonl(VAL_ROW), "name 'gold' matches '*gold*'"),
    ("tickettune/labels.py", b"", "matches '*label*'"),  # blunt on purpose: rename the module
    # refused by content: labels under another name
    ("data/northstar/val.jsonl", jsonl({**VAL_ROW, "intent": "x"}), "rows carry 'intent' (only train.jsonl"),
    ("data/northstar/val.jsonl", jsonl(VAL_ROW, {**VAL_ROW, "id": 2, "ideal_reply": "y"}), "rows carry 'ideal_reply'"),
    ("data/extra/holdout/expected.jsonl", jsonl({"id": 1, "intent": "a", "ideal_reply": "b"}),
     "rows carry 'ideal_reply', 'intent' (only train.jsonl may hold labels)"),
    ("data/northstar/train.jsonl", jsonl(TRAIN_ROW, {**TRAIN_ROW, "id": 2, "must_mention": ["x"]}),
     "rows carry 'must_mention' (grader-only fields)"),
    ("bench/expected.json", json.dumps({"rows": [{"id": 1, "ideal_reply": "b"}]}).encode(), "rows carry 'ideal_reply'"),
    ("data/sheet.csv", b"id,ticket,intent\n1,hi,a\n", "rows carry 'intent'"),
    ("data/sheet.tsv", b"id\tmust_not_mention\n1,x\n", "grader-only"),
])
def test_deny_refuses(path: str, content: bytes, reason: str) -> None:
    assert any(reason in r for r in deny_reasons(path, content)), deny_reasons(path, content)


@pytest.mark.parametrize("path, content", [
    ("data/northstar/train.jsonl", jsonl(TRAIN_ROW)),    # the labelled training input is meant to ship
    ("data/northstar/val.jsonl", jsonl(VAL_ROW)),
    ("data/northstar/val.jsonl", b"not json\n" + jsonl(VAL_ROW)),
    ("tickettune/evaluate.py", b"must_mention = row['must_mention']\n"),  # code is not scanned
    ("results.json", json.dumps({"predictions": [{"id": 1, "predicted_intent": "a"}]}).encode()),
    ("README.md", b"The grader keeps ideal_reply and intent on the host.\n"),
])
def test_deny_allows(path: str, content: bytes) -> None:
    assert deny_reasons(path, content) == []


def test_real_val_files_carry_no_labels_and_real_labels_are_refused() -> None:
    for path in sorted((REPO / "data").glob("*/*.jsonl")):
        rel = path.relative_to(REPO).as_posix()
        refused = bool(deny_reasons(rel, path.read_bytes()))
        assert refused == (path.name not in ("train.jsonl", "val.jsonl")), rel


# --- the zip --------------------------------------------------------------------------------------
def test_build_is_byte_identical_whatever_the_order() -> None:
    assert build_zip(GOOD) == build_zip(dict(reversed(list(GOOD.items()))))


def test_build_fixes_names_dates_modes_and_compression() -> None:
    with zipfile.ZipFile(io.BytesIO(build_zip(GOOD))) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == sorted(GOOD)
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.external_attr >> 16 for i in infos} == {0o100644}
        assert {i.compress_type for i in infos} == {zipfile.ZIP_DEFLATED}
        assert {n: zf.read(n) for n in zf.namelist()} == GOOD


def test_build_twice_from_a_tree_gives_identical_bytes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_tree(tmp_path / "repo", GOOD)
    assert cli.main(["package", "--root", str(root), "--out", str(tmp_path / "a.zip")]) == 0
    for p in root.rglob("*"):  # new mtimes and modes must not reach the bytes
        if p.is_file():
            os.utime(p, (1_700_000_000, 1_700_000_000))
            p.chmod(0o600)
    assert cli.main(["package", "--root", str(root), "--out", str(tmp_path / "b.zip")]) == 0
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


# --- the grader's rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("files, filename, expected", [
    (GOOD, "repo.zip", []),
    ({f"repo/{k}": v for k, v in GOOD.items()}, "repo.zip", []),  # one top-level folder is fine
    ({"run.py": b"", "README.md": b""}, "REPO.ZIP", []),
    ({k: v for k, v in GOOD.items() if k != "README.md"}, "repo.zip", ["README.md: missing next to run.py"]),
    ({**GOOD, "README.md": None, "docs/README.md": b""}, "repo.zip", ["README.md: missing next to run.py"]),
    ({"a/b/run.py": b"", "a/b/README.md": b""}, "repo.zip",
     ["run.py: not at the root or directly inside one top-level folder (found a/b/run.py)", "README.md: missing"]),
    ({"a/run.py": b"", "a/README.md": b"", "b/x.py": b""}, "repo.zip",
     ["run.py: not at the root or directly inside one top-level folder (found a/run.py)", "README.md: missing at the root"]),
    ({"README.md": b""}, "repo.zip", ["run.py: not at the root or directly inside one top-level folder (no run.py"]),
    ({**GOOD, "data/northstar/val_labels.jsonl": jsonl(LABEL_ROW)}, "repo.zip",
     ["hidden evaluation files: data/northstar/val_labels.jsonl (name 'val_labels.jsonl' matches '*label*'"]),
    ({**GOOD, "data/northstar/val.jsonl": jsonl({**VAL_ROW, "intent": "a"})}, "repo.zip",
     ["hidden evaluation files: data/northstar/val.jsonl (rows carry 'intent'"]),
    ({**GOOD, "../run.py": b""}, "repo.zip", ["zip: unsafe member paths ['../run.py']"]),
    ({}, "repo.zip", ["zip: the archive holds no files", "run.py: not at the root", "README.md: missing at the root"]),
    (GOOD, "repo.tar.gz", ["zip: 'repo.tar.gz' does not end in .zip"]),
])
def test_validate_rules(files: dict, filename: str, expected: list[str]) -> None:
    problems = validate_zip(make_zip({k: v for k, v in files.items() if v is not None}), filename)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), (problem, start)


def test_validate_not_a_zip() -> None:
    assert validate_zip(b"PK\x03\x04 but not really a zip", "repo.zip")[0].startswith("zip: not a zip archive")
    assert validate_zip(b"", "repo.zip")[0].startswith("zip: not a zip archive")


def test_validate_size_over_the_real_limit() -> None:
    big = make_zip({**GOOD, "weights.bin": os.urandom(MAX_ZIP_BYTES)}, compression=zipfile.ZIP_STORED)
    assert validate_zip(big, "repo.zip") == [f"size: {len(big):,} bytes is over the 20,000,000-byte limit"]


def test_validate_size_limit_is_inclusive() -> None:
    data = make_zip(GOOD)
    assert validate_zip(data, "repo.zip", max_bytes=len(data)) == []
    assert validate_zip(data, "repo.zip", max_bytes=len(data) - 1)[0].startswith("size: ")


def test_validate_lists_every_failed_rule_at_once() -> None:
    data = make_zip({"a/b/run.py": b"", "val_labels.jsonl": jsonl(LABEL_ROW)})
    problems = validate_zip(data, "repo.rar", max_bytes=10)
    assert [p.split(":")[0] for p in problems] == ["zip", "size", "run.py", "README.md", "hidden evaluation files"]


@pytest.mark.parametrize("names, root", [
    (["run.py", "README.md", "x/y.py"], ""),
    (["repo/run.py", "repo/README.md", "repo/x/y.py"], "repo/"),
    (["repo/run.py", "other.txt"], None),
    (["a/b/run.py"], None),
    ([], None),
])
def test_run_root(names: list[str], root: str | None) -> None:
    assert run_root(names) == root


# --- the command ----------------------------------------------------------------------------------
def test_command_builds_lists_and_validates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_tree(tmp_path / "repo", {**GOOD, "data/northstar/val_labels.jsonl": jsonl(LABEL_ROW),
                                          "tests/test_x.py": b"", "weights/adapter.bin": b"\0" * 100})
    out = tmp_path / "dist" / "repo.zip"
    assert cli.main(["package", "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "data/northstar/train.jsonl" in printed and "total in 6 files" in printed and "passes" in printed
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(GOOD)
    assert [p.name for p in out.parent.iterdir()] == ["repo.zip"]  # no temp file left behind
    assert cli.main(["package", "--check", str(out)]) == 0


def test_command_refuses_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_tree(tmp_path / "repo", {k: v for k, v in GOOD.items() if k != "README.md"})
    out = tmp_path / "dist" / "repo.zip"
    assert cli.main(["package", "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fails 1 submission rule" in err and "README.md: missing next to run.py" in err
    assert "nothing written" in err
    assert not out.exists() and not list(out.parent.glob("*"))


@pytest.mark.parametrize("argv_tail, message", [
    (["--out", "dist/repo.tar"], "does not end in .zip"),
    (["--root", "no/such/folder"], "is not a folder"),
])
def test_command_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture, argv_tail: list[str],
                                       message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(write_tree(tmp_path, GOOD))
    assert cli.main(["package", *argv_tail]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, name, message", [
    (b"hello", "repo.zip", "zip: not a zip archive"),
    (None, "missing.zip", "zip: cannot read"),
    (make_zip({"README.md": b""}), "repo.zip", "run.py: not at the root"),
])
def test_check_refuses(tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes | None, name: str,
                       message: str) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert cli.main(["package", "--check", str(tmp_path / name)]) == 2
    assert message in capsys.readouterr().err


# --- end to end: the zip runs from a clean unzip --------------------------------------------------
@pytest.mark.slow
def test_zip_runs_from_a_clean_unzip(tmp_path: Path) -> None:
    """Build the zip from this repo, unzip it into an empty folder, run its run.py there on a tiny slice."""
    out = tmp_path / "repo.zip"
    assert cli.main(["package", "--root", str(REPO), "--out", str(out)]) == 0, "the repo does not package (see output)"
    unzipped = tmp_path / "unzipped"
    with zipfile.ZipFile(out) as zf:
        zf.extractall(unzipped)
        cwd = unzipped / run_root(zf.namelist())

    inputs = tmp_path / "in"
    inputs.mkdir()
    train_rows = (REPO / "data/northstar/train.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    val_rows = (REPO / "data/northstar/val.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    (inputs / "train.jsonl").write_text("\n".join(train_rows) + "\n", encoding="utf-8")
    (inputs / "val.jsonl").write_text("\n".join(val_rows) + "\n", encoding="utf-8")
    config = {"train": {"epochs": 1, "max_steps": 2}, "infer": {"max_new_tokens": 8}}
    (inputs / "config.json").write_text(json.dumps(config), encoding="utf-8")
    weights, output = tmp_path / "weights", tmp_path / "out" / "results.json"
    weights.mkdir()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # only the unzipped copy and installed packages may be imported
    # the unzipped package shadows the editable install: the script's folder comes first on sys.path
    found = subprocess.run([sys.executable, "-c", "import tickettune; print(tickettune.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).resolve().is_relative_to(unzipped.resolve()), found

    proc = subprocess.run(
        [sys.executable, "run.py", "--train", str(inputs / "train.jsonl"), "--val", str(inputs / "val.jsonl"),
         "--weights", str(weights), "--output", str(output), "--config", str(inputs / "config.json")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"run.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    results = json.loads(output.read_text(encoding="utf-8"))
    training = results["training"]
    for key in ("steps", "train_loss", "val_loss", "wall_clock_s"):
        assert isinstance(training[key], (int, float)) and not isinstance(training[key], bool), (key, training)
    intents = {json.loads(r)["intent"] for r in train_rows}
    val_ids = [json.loads(r)["id"] for r in val_rows]
    predictions = results["predictions"]
    assert [p["id"] for p in predictions] == val_ids
    for p in predictions:
        assert p["predicted_intent"] in intents, p
        assert isinstance(p["prediction"], str), p
