#!/usr/bin/env python
"""GPU-path benchmark on synthetic weights: the real run.py on a Qwen2.5-shaped model with random bf16 weights.

No weights and no internet exist on the lent GPU machine, so this builds the model folder itself
(config + random bf16 safetensors + a tokenizer exported from the bundled SmolLM2, whose ChatML
template matches Qwen's), builds a random-weight all-MiniLM-L6-v2 for the embedder, then times
`python run.py` end to end on the sample data (30 train, 50 val rows, real token lengths) with a
fixed reply length (random weights never emit end-of-turn), twice, and checks the two runs are
byte-identical. Prints one table.

    python bench/gpu_synthetic.py --prepare .cache/gpu_assets          # here (CPU): export tokenizer + MiniLM config
    python bench/gpu_synthetic.py --assets .cache/gpu_assets --arch qwen2.5-7b --runs 2     # on the GPU
    python bench/gpu_synthetic.py --assets .cache/gpu_assets --arch tiny --runs 1           # CPU smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {  # Qwen2 configs of the real models (hidden, intermediate, layers, heads, kv heads, vocab)
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}
H100_BF16_FLOPS = 989e12  # dense bf16 peak, for the MFU estimate
MINILM_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "1_Pooling")


def prepare(assets: Path) -> None:
    """Export what must travel to the GPU machine (a few MB): tokenizer + MiniLM config/tokenizer."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from tickettune.pipeline.embeddings import embedder_path
    from tickettune.pipeline.plan import BUNDLED_GGUF, bundled_model_dir

    assets.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(bundled_model_dir(), gguf_file=BUNDLED_GGUF).save_pretrained(assets / "tokenizer")
    src, dst = embedder_path(), assets / "minilm"
    dst.mkdir(exist_ok=True)
    for name in MINILM_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
        else:
            shutil.copy(src / name, dst / name)
    print(f"assets written to {assets} ({sum(f.stat().st_size for f in assets.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


def build_model(assets: Path, arch: str, folder: Path) -> tuple[float, int]:
    """Random-weight model folder (bf16 on GPU, fp32 on CPU). Returns (seconds, parameter count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")
    cfg = AutoConfig.for_model("qwen2", max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **ARCHS[arch])
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model
    if cuda:
        torch.cuda.empty_cache()
    # the embedder: random MiniLM weights in the real architecture (speed, not semantics)
    from transformers import BertConfig, BertModel

    minilm = folder.parent / "minilm"
    if not minilm.exists():
        shutil.copytree(assets / "minilm", minilm)
        BertModel(BertConfig.from_pretrained(minilm)).save_pretrained(minilm, safe_serialization=True)
    return time.perf_counter() - t0, n_params


def run_once(folder: Path, work: Path, name: str, max_new_tokens: int, extra_cfg: dict) -> dict:
    cfg = work / "bench_config.json"
    cfg.write_text(json.dumps({"infer": {"max_new_tokens": max_new_tokens, **extra_cfg.get("infer", {})},
                               "train": extra_cfg.get("train", {})}))
    out, weights = work / f"{name}.json", work / f"{name}_weights"
    env = dict(os.environ, TICKETTUNE_EMBEDDER=str(folder.parent / "minilm"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "run.py"), "--train", str(ROOT / "data/northstar/train.jsonl"),
           "--val", str(ROOT / "data/northstar/val.jsonl"), "--weights", str(weights), "--output", str(out),
           "--base-model", str(folder), "--config", str(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run.py failed:\n{proc.stderr[-5000:]}")
    log = proc.stderr
    stage = lambda s: float(m.group(1)) if (m := re.search(rf"{s}\s+([\d.]+) s  \(total", log)) else float("nan")  # noqa: E731
    grab = lambda pat: float(m.group(1)) if (m := re.search(pat, log)) else float("nan")  # noqa: E731
    return {
        "wall_s": wall, "load_s": stage("load model"), "train_s": stage("train"), "predict_s": stage("predict"),
        "intent_s": grab(r"intent scoring ([\d.]+) s"), "gen_s": grab(r"generation ([\d.]+) s"),
        "gen_tok_s": grab(r"generation [\d.]+ s \(\d+ new tokens, ([\d.]+) tokens/s"),
        "train_tokens": grab(r"steps, (\d+) tokens"), "peak_gb": grab(r"peak GPU memory ([\d.]+) GB"),
        "predictions": json.loads(out.read_text())["predictions"], "log_tail": "\n".join(log.splitlines()[-12:]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", type=Path, help="export assets to this folder and exit")
    p.add_argument("--assets", type=Path, default=ROOT / ".cache" / "gpu_assets")
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-7b")
    p.add_argument("--work", type=Path, default=Path("/tmp/tickettune_gpu_bench"))
    p.add_argument("--runs", type=int, default=2, help="runs of run.py (>= 2 checks determinism)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--config", type=json.loads, default={}, help="extra run.py config as JSON")
    args = p.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.work / args.arch
    build_s, n_params = build_model(args.assets, args.arch, folder)
    runs = [run_once(folder, args.work, f"run{i}", args.max_new_tokens, args.config) for i in range(args.runs)]
    strip = lambda r: json.dumps([{k: v for k, v in p.items() if k != "latency_ms"} for p in r["predictions"]])  # noqa: E731
    identical = all(strip(r) == strip(runs[0]) for r in runs[1:]) if len(runs) > 1 else None
    print(runs[-1]["log_tail"], file=sys.stderr)
    print(f"\n{args.arch}: {n_params / 1e9:.2f} B parameters, build + save {build_s:.1f} s\n")
    print("| run | wall s | load s | train s | train tok | MFU | intent s | gen s | gen tok/s | peak GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(runs):
        # frozen base: forward 2N + backward activation-grad 2N flops per token (LoRA weight grads negligible)
        mfu = 4 * n_params * r["train_tokens"] / (r["train_s"] * H100_BF16_FLOPS)
        print(f"| {i + 1} | {r['wall_s']:.1f} | {r['load_s']:.1f} | {r['train_s']:.1f} | {r['train_tokens']:.0f} | "
              f"{mfu:.1%} | {r['intent_s']:.1f} | {r['gen_s']:.1f} | {r['gen_tok_s']:.0f} | {r['peak_gb']:.1f} |")
    if identical is not None:
        print(f"\npredictions byte-identical across {len(runs)} runs (latency_ms excluded): {identical}")
    return 0 if identical in (None, True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
