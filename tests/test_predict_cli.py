"""`tickettune predict` refuses what it cannot use, before any model loads (fast: no model here)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import write_jsonl
from tickettune.pipeline.weights_folder import FORMAT, META_FILE


def predict(tmp, weights, input_path, output=None):
    output = output or tmp / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tickettune", "predict", "--weights", str(weights),
                           "--input", str(input_path), "--output", str(output)],
                          capture_output=True, text=True, env=env, timeout=120)
    return proc, output


@pytest.fixture()
def tickets(tmp_path):
    return write_jsonl(tmp_path / "tickets.jsonl", [{"id": "a", "ticket": "Where is my invoice?"}])


def fake_weights(tmp, **meta):
    folder = tmp / "weights"
    folder.mkdir()
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def test_a_missing_weights_folder_is_exit_2(tmp_path, tickets):
    proc, out = predict(tmp_path, tmp_path / "nope", tickets)
    assert proc.returncode == 2 and f"{tmp_path / 'nope'}: no such weights folder" in proc.stderr
    assert "load model" not in proc.stderr and not out.exists()


def test_a_folder_from_another_format_names_both_versions(tmp_path, tickets):
    weights = fake_weights(tmp_path, format=FORMAT + 1, tickettune="9.9.9")
    proc, _ = predict(tmp_path, weights, tickets)
    assert proc.returncode == 2
    assert f"written by tickettune 9.9.9 in format {FORMAT + 1}" in proc.stderr and f"reads format {FORMAT}" in proc.stderr


def test_an_incomplete_folder_lists_what_is_missing(tmp_path, tickets):
    weights = fake_weights(tmp_path, format=FORMAT, reply_adapter=True, plan={}, config={})
    (weights / "adapter_config.json").write_text("{}")
    proc, _ = predict(tmp_path, weights, tickets)
    assert proc.returncode == 2 and "incomplete weights folder, missing" in proc.stderr
    for name in ("adapter_model.safetensors", "examples.jsonl", "embeddings.safetensors", "reply/adapter_config.json",
                 "'taxonomy'", "'ensemble_weights'"):
        assert name in proc.stderr
    assert "missing adapter_config.json" not in proc.stderr


def test_a_folder_that_is_not_ours_is_named(tmp_path, tickets):
    (tmp_path / "weights").mkdir()
    proc, _ = predict(tmp_path, tmp_path / "weights", tickets)
    assert proc.returncode == 2 and f"not a tickettune weights folder ({META_FILE} is missing)" in proc.stderr


def test_bad_input_and_bad_weights_are_reported_together(tmp_path):
    bad = tmp_path / "in.csv"
    bad.write_text("id,body\n1,hello\n")
    proc, out = predict(tmp_path, tmp_path / "nope", bad)
    assert proc.returncode == 2 and not out.exists()
    assert f"{bad}:1: no 'ticket' column (header: id, body)" in proc.stderr and "no such weights folder" in proc.stderr


def test_an_output_path_that_is_a_folder_is_refused(tmp_path, tickets):
    proc, _ = predict(tmp_path, tmp_path / "nope", tickets, output=tmp_path)
    assert proc.returncode == 2 and f"--output {tmp_path}: is a folder" in proc.stderr


def test_embeddings_that_no_longer_match_the_rows_or_intents_are_named(tmp_path):
    import numpy as np

    from tickettune.pipeline.weights_folder import EMBEDDINGS_FILE, WeightsError, check_vectors

    good = {"tickets": np.zeros((3, 4)), "replies": np.zeros((3, 4)), "names": np.zeros((2, 4))}
    check_vectors(tmp_path, good, rows=3, intents=2)
    check_vectors(tmp_path, {k: v for k, v in good.items() if k != "names"}, rows=3, intents=2)  # an older folder
    with pytest.raises(WeightsError, match=r"1 `names` vectors for 2 intents"):
        check_vectors(tmp_path, good | {"names": np.zeros((1, 4))}, rows=3, intents=2)
    with pytest.raises(WeightsError, match=rf"{EMBEDDINGS_FILE}: 3 `tickets` vectors for 4 train rows"):
        check_vectors(tmp_path, good, rows=4, intents=2)
    with pytest.raises(WeightsError, match="no `replies` vectors"):
        check_vectors(tmp_path, {"tickets": good["tickets"]}, rows=3, intents=2)
