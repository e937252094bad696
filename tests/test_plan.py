import json

import pytest

from tickettune import cli
from tickettune.plan import BUNDLED, GPU_LARGE, GPU_SMALL, Hardware, decide, model_override


@pytest.mark.parametrize("hw, override, model, device, dtype, method", [
    (Hardware(cuda=False), None, BUNDLED, "cpu", "float32", "lora"),
    (Hardware(cuda=False), "some/local-model", "some/local-model", "cpu", "float32", "lora"),
    (Hardware(cuda=True, free_gb=79, bf16=True), None, GPU_LARGE, "cuda", "bfloat16", "lora"),
    (Hardware(cuda=True, free_gb=20, bf16=True), None, GPU_LARGE, "cuda", "bfloat16", "lora"),
    (Hardware(cuda=True, free_gb=15, bf16=True, bitsandbytes=True), None, GPU_LARGE, "cuda", "bfloat16", "qlora"),
    (Hardware(cuda=True, free_gb=15, bf16=True), None, GPU_SMALL, "cuda", "bfloat16", "lora"),
    (Hardware(cuda=True, free_gb=12, bf16=False), None, GPU_SMALL, "cuda", "float16", "lora"),
    (Hardware(cuda=True, free_gb=40, bf16=True), "x/y", "x/y", "cuda", "bfloat16", "lora"),
])
def test_decide(hw, override, model, device, dtype, method):
    plan = decide(hw, override)
    assert (plan.model, plan.device, plan.dtype, plan.method) == (model, device, dtype, method)
    assert plan.reason


def test_flag_beats_environment(monkeypatch):
    monkeypatch.setenv("TICKETTUNE_BASE_MODEL", "env/model")
    assert model_override("flag/model") == "flag/model"
    assert model_override(None) == "env/model"
    monkeypatch.setenv("TICKETTUNE_BASE_MODEL", "")
    assert model_override(None) is None


def test_plan_command_simulates_a_gpu(capsys):
    assert cli.main(["plan", "--simulate-gpu-gb", "80", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == GPU_LARGE
    assert cli.main(["plan", "--simulate-gpu-gb", "8", "--bitsandbytes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "qlora"
