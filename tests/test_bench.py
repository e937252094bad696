"""The benchmarks keep working: each runs on a small slice with tiny settings (CPU)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE, write_jsonl

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
                                                            "intent: proto only", "tickettune"]
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
