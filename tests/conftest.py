import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite runs on the small encoder (MiniLM; the default, `auto`, is mpnet where scripts/setup.sh set it up,
# whose fine-tuning costs ~4x more): the choice itself is test_encoder_choice.py's, which clears this, and
# test_mpnet_run.py runs run.py and predict on the real mpnet.
os.environ.setdefault("TICKETTUNE_ENCODER", "minilm")
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "northstar"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled SmolLM2 tokenizer (real chat template), loaded once."""
    from transformers import AutoTokenizer

    from tickettune.pipeline.plan import BUNDLED_GGUF, bundled_model_dir

    tok = AutoTokenizer.from_pretrained(bundled_model_dir(), gguf_file=BUNDLED_GGUF)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


# generation forced on: the runs that share it test the generating path end to end (the CPU plan composes by default)
TINY = {"train": {"epochs": 1, "max_steps": 2, "batch_size": 8}, "infer": {"max_new_tokens": 12, "reply_source": "generate"}}


def child_env(**extra: str) -> dict:
    """The environment for a child process of the tool: this one's, without PYTHONPATH, hub offline."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"} | extra


def run_py(tmp, name, train, val, extra=(), config=TINY, cwd=ROOT, script=ROOT / "run.py"):
    """run.py in a child process (`child_env`): (process, results path, weights folder)."""
    cfg = tmp / f"{name}.config.json"
    cfg.write_text(json.dumps(config))
    out, weights = tmp / name / "results.json", tmp / name / "weights"
    env = child_env()
    proc = subprocess.run([sys.executable, str(script), "--train", str(train), "--val", str(val),
                           "--weights", str(weights), "--output", str(out), "--config", str(cfg), *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, weights


def sample_slice(tmp):
    """Four intents of the sample's train rows and its first four val tickets, written under `tmp`."""
    train = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()]
    intents = sorted({r["intent"] for r in train})[:4]
    rows = [r for r in train if r["intent"] in intents]
    val = [json.loads(line) for line in (SAMPLE / "val.jsonl").read_text().splitlines()][:4]
    return write_jsonl(tmp / "train.jsonl", rows), write_jsonl(tmp / "val.jsonl", val), rows, val


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One real run.py with tiny settings on `sample_slice`, shared by the slow tests that need a
    trained weights folder (each run costs about a minute and a half on 2 cores): (process,
    results path, weights folder, train rows, val rows). Tests only read the folder."""
    tmp = tmp_path_factory.mktemp("tiny-run")
    train, val, train_rows, val_rows = sample_slice(tmp)
    proc, out, weights = run_py(tmp, "a", train, val)
    return proc, out, weights, train_rows, val_rows
