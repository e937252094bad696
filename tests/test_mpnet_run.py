"""The default encoder end to end: with nothing named, run.py on a machine where scripts/setup.sh set up
all-mpnet-base-v2 trains and predicts on it (`auto`), records it in the weights folder, and
`tickettune predict` reproduces run.py's predictions on it even in a process told to use minilm (a saved
model keeps its own encoder). Real models, tiny settings; skipped where the mpnet folder is not set up."""

import json
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from conftest import ROOT, TINY, child_env, sample_slice
from tickettune.pipeline import config, mpnet

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not mpnet.is_ready(mpnet.folder()), reason="scripts/setup.sh has not made the mpnet folder")]


def test_run_py_defaults_to_mpnet_where_it_is_set_up_and_predict_reproduces_it(tmp_path):
    train, val, _, val_rows = sample_slice(tmp_path)
    settings = tmp_path / "tiny.json"
    settings.write_text(json.dumps(TINY | {"encoder": {"min_steps": 4, "max_steps": 4}}))
    weights, out = tmp_path / "weights", tmp_path / "results.json"
    env = {k: v for k, v in child_env().items() if k != config.ENV_ENCODER}  # nothing named: the default
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--train", str(train), "--val", str(val),
                           "--weights", str(weights), "--output", str(out), "--config", str(settings)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sentence encoder mpnet" in proc.stderr and "intent encoder: 4 steps" in proc.stderr
    meta = json.loads((weights / "tickettune.json").read_text())
    assert meta["embedder"] == mpnet.NAME and meta["config"]["encoder"]["model"] == "mpnet"
    assert load_file(str(weights / "embeddings.safetensors"))["tickets"].shape[1] == 768

    again = tmp_path / "again.json"
    proc = subprocess.run([sys.executable, "-m", "tickettune", "predict", "--weights", str(weights), "--input",
                           str(val), "--output", str(again)], cwd=tmp_path,
                          env=env | {config.ENV_ENCODER: "minilm"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved, predicted = json.loads(out.read_text())["predictions"], json.loads(again.read_text())["predictions"]
    assert [p["id"] for p in saved] == [r["id"] for r in val_rows]
    assert [(p["id"], p["predicted_intent"], p["prediction"]) for p in predicted] == \
           [(p["id"], p["predicted_intent"], p["prediction"]) for p in saved]
