import json

import pytest

from tickettune.tools import cli
from tickettune.pipeline.plan import BUNDLED, GPU_LARGE, GPU_SMALL, Hardware, decide, fallbacks, model_override


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


def test_fallbacks_of_an_automatic_gpu_choice_end_on_the_bundled_cpu_plan():
    hw = Hardware(cuda=True, free_gb=79, bf16=True, cpu_bf16=True)
    chain = fallbacks(decide(hw), hw, None)
    assert [(p.model, p.device) for p in chain] == [(GPU_SMALL, "cuda"), (BUNDLED, "cpu")]
    assert chain[0].dtype == "bfloat16" and chain[1].dtype == "float32" and chain[1].autocast == "bfloat16"
    assert all(p.reason.startswith("fallback:") for p in chain)
    small = Hardware(cuda=True, free_gb=12, bf16=True)
    assert [p.model for p in fallbacks(decide(small), small, None)] == [BUNDLED]  # no second small model
    qlora = Hardware(cuda=True, free_gb=12, bf16=True, bitsandbytes=True)
    assert fallbacks(decide(qlora), qlora, None)[0].method == "lora"  # the small model is not quantised


def test_a_named_model_or_the_cpu_plan_has_no_fallback():
    gpu = Hardware(cuda=True, free_gb=79, bf16=True)
    assert fallbacks(decide(gpu, "my/model"), gpu, "my/model") == []
    assert fallbacks(decide(Hardware(cuda=False)), Hardware(cuda=False), None) == []


def test_load_first_falls_through_failing_plans_and_reports_why(caplog):
    from tickettune.pipeline.modeling import load_first

    hw = Hardware(cuda=True, free_gb=79, bf16=True)
    plans = [decide(hw)] + fallbacks(decide(hw), hw, None)
    tried = []

    def loader(plan):
        tried.append(plan.model)
        if plan.model != BUNDLED:
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {plan.model}\nmore detail")
        return "model", "tokenizer"

    model, tokenizer, used = load_first(plans, loader)
    assert (model, tokenizer, used) == ("model", "tokenizer", plans[-1]) and tried == [GPU_LARGE, GPU_SMALL, BUNDLED]
    assert f"could not load {GPU_LARGE}: OSError: We couldn't connect" in caplog.text
    assert "more detail" not in caplog.text and "fallback:" in caplog.text


def test_load_first_raises_the_first_error_when_nothing_loads():
    from tickettune.pipeline.modeling import load_first

    def loader(plan):
        raise OSError(f"cannot load {plan.model}")

    from tickettune.pipeline.modeling import ModelLoadError

    with pytest.raises(ModelLoadError, match="first/model: OSError: cannot load first/model"):
        load_first([decide(Hardware(cuda=False), "first/model"), decide(Hardware(cuda=False))], loader)


@pytest.mark.parametrize("version, key", [("5.17.0", "dtype"), ("4.56.0", "dtype"), ("4.55.4", "torch_dtype"),
                                          ("4.46.3", "torch_dtype")])
def test_dtype_argument_follows_the_transformers_version(monkeypatch, version, key):
    import transformers

    from tickettune.pipeline.modeling import dtype_kwarg

    monkeypatch.setattr(transformers, "__version__", version)
    assert dtype_kwarg("bfloat16") == {key: "bfloat16"}


def test_a_failed_load_is_released_before_the_next_plan_is_tried():
    import gc
    import weakref

    from tickettune.pipeline.modeling import load_first

    class HalfLoaded:  # stands in for a model whose load failed midway
        pass

    alive = []

    def loader(plan):
        if plan.model == "big":
            half = HalfLoaded()
            alive.append(weakref.ref(half))
            raise MemoryError("out of memory while loading")
        gc.collect()
        return [r() is not None for r in alive], None

    released, _, used = load_first([decide(Hardware(cuda=False), "big"), decide(Hardware(cuda=False))], loader)
    assert used.model == BUNDLED and released == [False]
