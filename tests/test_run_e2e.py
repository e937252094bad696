"""End to end: run.py on the real bundled model with tiny settings (a few steps, short replies)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE, write_jsonl

pytestmark = pytest.mark.slow
TINY = {"train": {"epochs": 1, "max_steps": 2, "batch_size": 8}, "infer": {"max_new_tokens": 12}}


def run_py(tmp, name, train, val, extra=(), config=TINY, cwd=ROOT, script=ROOT / "run.py"):
    cfg = tmp / f"{name}.config.json"
    cfg.write_text(json.dumps(config))
    out, weights = tmp / name / "results.json", tmp / name / "weights"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), "--train", str(train), "--val", str(val),
                           "--weights", str(weights), "--output", str(out), "--config", str(cfg), *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, weights


def sample_slice(tmp):
    train = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()]
    intents = sorted({r["intent"] for r in train})[:4]
    rows = [r for r in train if r["intent"] in intents]
    val = [json.loads(line) for line in (SAMPLE / "val.jsonl").read_text().splitlines()][:3]
    return write_jsonl(tmp / "train.jsonl", rows), write_jsonl(tmp / "val.jsonl", val), rows, val


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    train, val, train_rows, val_rows = sample_slice(tmp)
    first = run_py(tmp, "a", train, val)
    second = run_py(tmp, "b", train, val)
    return first, second, train_rows, val_rows


def test_results_schema_and_taxonomy(two_runs):
    (proc, out, weights), _, train_rows, val_rows = two_runs
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == {"training", "predictions"}
    t = data["training"]
    assert t["steps"] == 4 and t["wall_clock_s"] > 0  # max_steps 2 per adapter: intent + reply
    assert all(isinstance(t[k], (int, float)) for k in ("train_loss", "val_loss"))
    assert [p["id"] for p in data["predictions"]] == [r["id"] for r in val_rows]
    taxonomy = {r["intent"] for r in train_rows}
    for p in data["predictions"]:
        assert set(p) == {"id", "prediction", "predicted_intent", "latency_ms", "tokens_used"}
        assert p["predicted_intent"] in taxonomy
        assert isinstance(p["prediction"], str) and p["prediction"].strip()
        assert p["tokens_used"] > 0 and p["latency_ms"] >= 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "reply/adapter_config.json",
                 "reply/adapter_model.safetensors", "tickettune.json", "loss_history.json",
                 "diagnostics.jsonl", "tokenizer.json"):
        assert (weights / name).is_file(), name
    meta = json.loads((weights / "tickettune.json").read_text())
    assert meta["taxonomy"] == sorted(taxonomy) and meta["config"]["train"]["max_steps"] == 2
    assert "train" in proc.stderr and "predict" in proc.stderr  # one line per stage


def test_rerun_is_byte_identical(two_runs):
    (_, out_a, w_a), (proc_b, out_b, w_b), _, _ = two_runs
    assert proc_b.returncode == 0, proc_b.stderr[-3000:]

    def stable(path):  # latency_ms is a measured time, the one field that may differ
        preds = json.loads(path.read_text())["predictions"]
        return json.dumps([{k: v for k, v in p.items() if k != "latency_ms"} for p in preds], ensure_ascii=False)

    assert stable(out_a) == stable(out_b)
    digest = [hashlib.sha256((w / "adapter_model.safetensors").read_bytes()).hexdigest() for w in (w_a, w_b)]
    assert digest[0] == digest[1]


def test_saved_adapter_reproduces_the_predictions(two_runs):
    """PeftModel.from_pretrained(base, weights) + the saved config gives the same predictions."""
    (_, out, weights), _, _, _ = two_runs
    from tickettune import modeling
    from tickettune.config import InferConfig
    from tickettune.data import load_train, load_val
    from tickettune.embeddings import embed
    from tickettune.plan import Plan
    from tickettune.predict import predict
    from tickettune.retrieval import RetrievalIndex

    meta = json.loads((weights / "tickettune.json").read_text())
    plan = Plan(**meta["plan"])
    base, tokenizer = modeling.load_base(plan)
    infer = InferConfig(**meta["config"]["infer"])
    model = modeling.load_adapter(base, weights)
    train_rows, val_rows = load_train(weights.parents[1] / "train.jsonl"), load_val(weights.parents[1] / "val.jsonl")
    index = RetrievalIndex.fit(train_rows, embed([r.ticket for r in train_rows]), embed([r.ideal_reply for r in train_rows]))
    with modeling.autocast(plan):
        predictions, _ = predict(model, tokenizer, index, val_rows, embed([r.ticket for r in val_rows]),
                                 infer, meta["lm_weight"])
    saved = json.loads(out.read_text())["predictions"]
    assert [(p.id, p.predicted_intent, p.prediction) for p in predictions] == \
           [(p["id"], p["predicted_intent"], p["prediction"]) for p in saved]
