"""`tickettune plan`: print the hardware plan (`pipeline.plan.decide`) and the sentence encoder a run
here would use, without loading anything."""

from __future__ import annotations

import argparse
import json

from tickettune.pipeline.config import DEFAULT_ENCODER, ENCODER_CHOICES, ENV_ENCODER, ConfigError, encoder_choice
from tickettune.pipeline.plan import ENV_MODEL, Hardware, decide, detect_hardware, model_override


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", help=f"model override (else ${ENV_MODEL}, else automatic)")
    parser.add_argument("--encoder", choices=ENCODER_CHOICES,
                        help=f"sentence encoder (else ${ENV_ENCODER}, else {DEFAULT_ENCODER}: mpnet where it is set up, else minilm)")
    parser.add_argument("--simulate-gpu-gb", type=float, metavar="N",
                        help="decide as if a GPU with N GB free were present (nothing is loaded)")
    parser.add_argument("--bitsandbytes", action="store_true", help="with --simulate-gpu-gb: pretend bitsandbytes is importable")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    if args.simulate_gpu_gb is not None:
        hw = Hardware(cuda=True, gpu_name="simulated GPU", free_gb=args.simulate_gpu_gb, bf16=True,
                      bitsandbytes=args.bitsandbytes)
    else:
        hw = detect_hardware()
    plan = decide(hw, model_override(args.base_model))
    try:
        named = encoder_choice(args.encoder) or DEFAULT_ENCODER
    except ConfigError as exc:
        print(exc)
        return 2
    from tickettune.pipeline.embeddings import resolve_encoder

    encoder = resolve_encoder(named, quiet=True)  # the folder only: run.py may also try the hub off the CPU plan
    shown = plan.to_dict() | {"encoder": encoder if encoder == named else f"{encoder} ({named})"}
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        for key, value in shown.items():
            print(f"{key:>7}: {value}")
    return 0
