"""The benchmarks keep working: each runs on a small slice with tiny settings (CPU)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE

pytestmark = pytest.mark.slow


def test_quality_bench_prints_the_comparison_table(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"train": {"epochs": 1, "max_steps": 2}, "infer": {"max_new_tokens": 16}}))
    out_json = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--data", str(SAMPLE),
                           "--config", str(config), "--limit-val", "4", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = json.loads(out_json.read_text())
    assert list(tables) == ["northstar"]
    table = tables["northstar"]
    assert [a for a in table if a != "intent: lm only"] == ["knn-copy", "finetune-copy", "intent: encoder only",
                                                            "intent: proto only", "intent: logreg only",
                                                            "tickettune"]
    for row in table.values():
        assert 0.0 <= row["intent"] <= 1.0 and 0.0 <= row["composite"] <= 1.0
    assert "| northstar | tickettune |" in proc.stdout and "reply gain over copying" in proc.stdout


def gpu_defaults(**train) -> dict:
    """The GPU plan's settings (label list in the prompt, merged reply adapter, 2 references,
    2048-token batches), so the CPU run of the bench walks the code paths the GPU run takes."""
    from tickettune.pipeline.config import RunConfig

    cfg = RunConfig.for_plan("cuda").to_dict()
    cfg["infer"].pop("max_new_tokens")
    return {"train": {**cfg["train"], **train}, "infer": cfg["infer"]}


def test_gpu_synthetic_bench_runs_on_cpu_with_a_tiny_config(tmp_path):
    assets = tmp_path / "assets"
    prep = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_synthetic.py"), "--prepare", str(assets)],
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert (assets / "tokenizer" / "tokenizer.json").is_file() and not (assets / "minilm" / "model.safetensors").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_synthetic.py"), "--assets", str(assets),
                           "--arch", "tiny", "--runs", "2", "--max-new-tokens", "8", "--work", str(tmp_path / "work"),
                           "--config", json.dumps(gpu_defaults(max_steps=2))],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predictions byte-identical across 2 runs (latency_ms excluded): True" in proc.stdout
    assert proc.stdout.count("| 1 |") == 1 and "| 2 |" in proc.stdout


SHARED = ROOT.parent / "shared" / "datasets"


@pytest.mark.skipif(not (SHARED / "banking77" / "train.csv").is_file(), reason="no ../shared/datasets here")
def test_fewshot_intent_bench_runs_every_method_and_writes_json(tmp_path):
    out = tmp_path / "fewshot.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fewshot_intent.py"), "--data",
                           str(SHARED / "banking77"), "--shots", "2", "--seeds", "0", "--limit-test", "40",
                           "--budget-s", "45", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["minilm-prototype", "minilm-logreg", "setfit", "tickettune"]
    assert all(r["shots"] == 2 and r["seed"] == 0 and 0.0 <= r["accuracy"] <= 1.0 for r in results)
    assert results[3]["accuracy"] >= 0.3 and results[2]["accuracy"] >= 0.2  # 2 rows of 77 intents: chance is 0.013
    assert results[2]["seconds"] < results[3]["seconds"] + 60  # SetFit stops at tickettune's seconds (+ predict)
    assert "| tickettune |" in proc.stdout and "| setfit |" in proc.stdout


@pytest.mark.skipif(not (SHARED / "bitext-12" / "rows.jsonl").is_file(), reason="no ../shared/datasets here")
def test_desks_bench_fast_mode_scores_every_rule_on_both_halves(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"encoder": {"min_steps": 5, "max_steps": 5}}))
    out = tmp_path / "desks.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "desks.py"), "--fast", "--bitext", "2", "--banking", "2",
                           "--no-fixed", "--config", str(config), "--cache", str(tmp_path / "cache"), "--json", str(out),
                           "--plot", str(tmp_path / "desks.png")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["desk"] for r in results] == ["bitext-0", "bitext-1", "banking77-0", "banking77-1"]
    assert [r["half"] for r in results] == ["choose", "report"] * 2
    bitext, banking = results[0]["methods"], results[2]["methods"]
    assert {"knn", "run", "prior=equal,move=never", "prior=proto,move=t", "copy", "compose", "knn-copy"} <= set(bitext)
    assert "proto" not in banking["run"]["weights"] and "reply" not in banking.get("compose", {})  # intent only
    assert bitext["run"]["weights"] == {"proto": 1.0, "logreg": 1.0, "encoder": 1.0}
    assert all(0.3 <= m["intent"] <= 1.0 for r in results for m in r["methods"].values() if "intent" in m)
    assert all(0.0 < m["reply"] <= 1.0 for m in bitext.values() if "reply" in m)
    assert "## Decisions" in proc.stdout and "the ensemble's prior, desks with replies" in proc.stdout
    assert (tmp_path / "desks.png").stat().st_size > 5_000
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "desks.py"), "--fast", "--bitext", "2", "--banking", "2",
                            "--no-fixed", "--config", str(config), "--cache", str(tmp_path / "cache"), "--json",
                            str(tmp_path / "again.json")], capture_output=True, text=True, timeout=900)
    assert json.loads((tmp_path / "again.json").read_text())["results"][0]["methods"] == bitext  # cached: identical


@pytest.mark.skipif(not (SHARED / "banking77" / "train.csv").is_file(), reason="no ../shared/datasets here")
def test_scale_bench_runs_a_cell_within_its_budget(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"train": {"epochs": 1, "max_steps": 2}, "infer": {"max_new_tokens": 8},
                                  "encoder": {"min_steps": 5, "max_steps": 5}}))
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--train-rows", "40", "--val-rows", "12",
                           "--budget-s", "200", "--config", str(config), "--json", str(out), "--plot",
                           str(tmp_path / "scale.png")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [cell] = json.loads(out.read_text())
    assert cell["train_rows"] == 40 and cell["val_rows"] == 12 and cell["steps"] > 0
    assert set(cell["stages_s"]) >= {"embed", "load model", "train", "predict"}
    assert cell["budget"]["costs"] is not None and (tmp_path / "scale.png").stat().st_size > 5_000


def test_one_row_per_intent_bench_scores_every_weighting(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"encoder": {"min_steps": 5, "max_steps": 5}}))
    out = tmp_path / "one_row.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "one_row_per_intent.py"), "--data", str(SAMPLE),
                           "--seeds", "0", "--config", str(config), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())["results"]
    assert {"prototypes", "linear head", "encoder", "encoder + linear head", "equal"} <= set(row)
    assert row["prototypes"] > 0.5 and row["equal"] > 0.5   # one row each of 12 intents: chance is 0.08
    assert f"| {SAMPLE.name} | 1 |" in proc.stdout


def test_desks_bench_full_mode_runs_run_py_and_the_other_reply_policy(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"train": {"epochs": 1, "max_steps": 2}, "infer": {"max_new_tokens": 8},
                                  "encoder": {"min_steps": 5, "max_steps": 5}}))
    out = tmp_path / "full.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "desks.py"), "--full", "--bitext", "0", "--banking", "0",
                           "--only", "data/northstar", "--config", str(config), "--json", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [desk] = json.loads(out.read_text())["results"]
    methods, facts = desk["methods"], desk["facts"]
    assert desk["desk"] == "data/northstar" and facts["steps"] > 0 and facts["reply_source"] in ("generate", "retrieve")
    assert {"run.py", "run.py without LM", "reply: generate", "reply: retrieve"} <= set(methods)
    assert methods["run.py"]["intent"] > 0.5 and methods["run.py"]["reply"] == methods[f"reply: {facts['reply_source']}"]["reply"]
    assert all(0.0 < methods[f"reply: {s}"]["reply"] <= 1.0 for s in ("generate", "retrieve"))
