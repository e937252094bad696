"""Model loading and the adapter on disk: base model per plan, LoRA attach, save, reload.

Does not train or predict. Seeding lives here because PEFT initialises LoRA weights from the
global RNG: `seed_everything` must run before `load_base` and `add_lora`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import numpy as np

from tickettune.pipeline.config import TrainConfig
from tickettune.pipeline.plan import BUNDLED, Plan

log = logging.getLogger(__name__)


def seed_everything(seed: int, device: str = "cpu") -> None:
    """Seed python, numpy and torch and ask torch for deterministic kernels (GPU included)."""
    if device == "cuda":  # must be set before the first cuBLAS call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # not needed: we never read empty tensors
    if device == "cuda":
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        # cuDNN attention backward returns NaN gradients on H100/H200 for some masked (padded)
        # lengths since torch 2.11 (pytorch#196678); the other SDPA kernels are unaffected
        torch.backends.cuda.enable_cudnn_sdp(False)


def autocast(plan: Plan):
    """Context for forward passes: bf16 autocast when the plan asks for it, else nothing."""
    import contextlib

    import torch

    if plan.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device, dtype=getattr(torch, plan.autocast))


def training_context(plan: Plan):
    """Context for training forwards: `autocast(plan)`, and on a GPU the math attention kernel,
    whose backward is deterministic (memory-efficient attention's backward uses atomics and
    only warns under `use_deterministic_algorithms(warn_only=True)`)."""
    import contextlib

    if plan.device != "cuda":
        return autocast(plan)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(autocast(plan))
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def load_base(plan: Plan):
    """(model, tokenizer) for `plan`, in eval mode, padding on the left for batched generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, plan.dtype)
    if plan.model == BUNDLED:
        from tickettune.pipeline import gguf_cache

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the CPU path never touches a hub
        folder = gguf_cache.converted(dtype_kwarg(dtype))  # the GGUF dequantized once, then read from the cache
        if folder is None:
            model, tokenizer = gguf_cache.convert(dtype_kwarg(dtype))
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **dtype_kwarg(dtype))
        model = model.to(plan.device)
    else:
        kwargs: dict = {**dtype_kwarg(dtype), "attn_implementation": "sdpa"}
        if plan.device == "cuda":
            kwargs["device_map"] = {"": 0}
        if plan.method == "qlora":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True)
        tokenizer = AutoTokenizer.from_pretrained(plan.model)
        model = AutoModelForCausalLM.from_pretrained(plan.model, **kwargs)
        if plan.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer


def dtype_kwarg(dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` since transformers 4.56, `torch_dtype` before
    (where `dtype` is silently ignored and a 7B model would load in fp32)."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def load_first(plans: list[Plan], loader=None):
    """(model, tokenizer, plan) for the first of `plans` whose model loads. Each failure is logged
    with its reason and its memory freed before the next plan is tried (only the message of an
    error is kept: its traceback would hold the half-loaded model). When all fail, raises
    `ModelLoadError` with the first plan's reason. See `plan.fallbacks`."""
    loader = loader or load_base
    first_error = ""
    for i, plan in enumerate(plans):
        try:
            model, tokenizer = loader(plan)
        except Exception as exc:  # noqa: BLE001 - any load failure (network, disk, memory) moves on
            message = str(exc).strip()
            reason = f"{type(exc).__name__}: {message.splitlines()[0][:300] if message else ''}"
        else:
            if i:
                log.warning("plan: %s", plan.describe())
            return model, tokenizer, plan
        free_memory()  # outside the handler: the failed load's tensors are unreachable now
        first_error = first_error or f"{plan.model}: {reason}"
        log.warning("could not load %s: %s%s", plan.model, reason,
                    "; trying the next plan" if i + 1 < len(plans) else "")
    raise ModelLoadError(first_error or "no plan to load")


class ModelLoadError(RuntimeError):
    """No plan's base model could be loaded."""


def out_of_memory_error() -> type[BaseException]:
    """torch's out-of-memory exception (`torch.OutOfMemoryError`; `torch.cuda.OutOfMemoryError` before 2.5)."""
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks (after an out-of-memory error)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halving_on_oom(run, items: list, single, what: str) -> list:
    """`run(items)` (one result per item), halving `items` while they run out of memory; an item that
    does not fit alone gets `single(item)`. The one out-of-memory rule of batched inference (label
    scoring, generation): the batch shrinks, no row is lost. Any other error propagates.

    >>> def run(items):
    ...     if len(items) > 2:
    ...         raise MemoryError
    ...     return [x * 10 for x in items]
    >>> halving_on_oom(run, [1, 2, 3, 4, 5], lambda x: None, "a test")
    [10, 20, 30, 40, 50]
    """
    try:
        return run(items)
    except (out_of_memory_error(), MemoryError):
        pass  # handled outside the handler, so that the traceback's tensors can be freed
    free_memory()
    if len(items) == 1:
        log.warning("%s ran out of memory for one row: it gets the safe default", what)
        return [single(items[0])]
    half = len(items) // 2
    log.warning("%s ran out of memory for %d rows: retrying in halves", what, len(items))
    return halving_on_oom(run, items[:half], single, what) + halving_on_oom(run, items[half:], single, what)


INTENT_ADAPTER = "default"   # saved at the root of --weights: adapter_config.json + adapter_model.safetensors
REPLY_ADAPTER = "reply"      # saved in --weights/reply/


def add_lora(model, cfg: TrainConfig):
    """Wrap `model` with fresh LoRA adapters on every linear projection (not the LM head): one for
    the intent task and, when replies are trained, one for the reply task. Two adapters, because
    one adapter trained on both tasks made the 135M model answer reply prompts with a label."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, adapter_name=INTENT_ADAPTER)
    if cfg.reply_epochs:
        model.add_adapter(REPLY_ADAPTER, lora)
    model.set_adapter(INTENT_ADAPTER)
    return model


@contextlib.contextmanager
def adapter(model, name: str):
    """Run the body with adapter `name` active (intent or reply), then restore the previous one.
    A model without that adapter runs as it is; a PeftModel without it runs the bare base model
    (no reply training: the base model writes the replies)."""
    if not hasattr(model, "peft_config"):
        yield model
        return
    if name not in model.peft_config:
        with model.disable_adapter():
            yield model
        return
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield model
    finally:
        model.set_adapter(previous)


@contextlib.contextmanager
def merged(model, name: str):
    """Run the body with adapter `name` merged into the base weights (one matmul per projection
    instead of three: faster decoding on a GPU), then restore the base weights *exactly*: the
    weights of the merged layers are copied before merging and copied back after, because
    subtracting the delta again does not round-trip in bf16 and the model must predict the same
    way next time. The copy costs the merged layers' memory; when it does not fit, the body runs
    with the adapter active but unmerged (same answers up to rounding, slower)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not hasattr(model, "peft_config") or name not in model.peft_config:
        with adapter(model, name):
            yield model
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and name in m.lora_A]
    try:
        saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    except (out_of_memory_error(), MemoryError):
        saved = None
    if saved is None:
        free_memory()
        log.warning("no memory for a copy of the base weights: generating with the %s adapter unmerged", name)
        with adapter(model, name):
            yield model
        return
    with adapter(model, name):
        model.base_model.merge_adapter(adapter_names=[name])
        try:
            yield model
        finally:
            model.base_model.unmerge_adapter()
            with torch.no_grad():
                for layer, weight in zip(layers, saved):
                    layer.get_base_layer().weight.copy_(weight)


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the generation config's eos plus the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def load_tokenizer(folder: str | Path):
    """The tokenizer a weights folder saved, prepared as `load_base` prepares the base model's (pad token,
    left padding): what prediction needs when it does not need the LM itself."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_adapter(base_model, weights_dir: str | Path):
    """The saved adapters on `base_model`, ready for prediction: `PeftModel.from_pretrained`
    (the intent adapter at the root), plus the reply adapter from its subfolder when present."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(weights_dir), adapter_name=INTENT_ADAPTER)
    if (Path(weights_dir) / REPLY_ADAPTER / "adapter_config.json").is_file():
        model.load_adapter(str(Path(weights_dir) / REPLY_ADAPTER), adapter_name=REPLY_ADAPTER)
    model.set_adapter(INTENT_ADAPTER)
    return model.eval()
