#!/usr/bin/env python
"""tickettune: fine-tune a base LLM with LoRA on labelled support tickets, then predict an intent
and a reply for every val ticket, in one invocation.

    python run.py --train train.jsonl --val val.jsonl --weights WEIGHTS_DIR --output results.json

Stages: validate inputs -> plan hardware -> embed -> load base model -> train LoRA -> save adapter
-> predict -> write results. See README.md. Should a model stage fail, the results are still
written, from retrieval alone, with an ERROR in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")      # 2-core machines: no spin-waiting threads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; set before any CUDA use

from tickettune import __version__, config, data, runlog  # noqa: E402
from tickettune.plan import BUNDLED, ENV_MODEL, decide, detect_hardware, fallbacks, model_override  # noqa: E402

log = logging.getLogger("tickettune")
EXIT_BAD_INPUT = 2
INFER_S_PER_ROW = {"cpu": 2.5, "cuda": 0.5}  # pessimistic, for the budget guard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="labelled JSONL: id, ticket, intent, ideal_reply")
    p.add_argument("--val", required=True, help="input JSONL: id, ticket")
    p.add_argument("--weights", required=True, help="folder for the adapters, tokenizer and run metadata (created if missing)")
    p.add_argument("--output", required=True, help="results JSON file (written atomically)")
    p.add_argument("--seed", type=int, default=None, help="seed for everything (else $TICKETTUNE_SEED, else 0)")
    p.add_argument("--base-model", default=None,
                   help=f"hub id or local folder; else ${ENV_MODEL}; else chosen by hardware")
    p.add_argument("--config", default=None, help="JSON file overriding settings, e.g. {\"train\": {\"epochs\": 2}}")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget for the whole run (default 1500)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"tickettune {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runlog.setup(args.verbose)
    clock = runlog.Clock()
    try:
        with clock.stage("validate"):
            train_rows, val_rows = load_inputs(args.train, args.val)
            overrides = config.load_overrides(args.config)
            check_paths(Path(args.weights), Path(args.output))
        with clock.stage("plan"):
            hardware, override = detect_hardware(), model_override(args.base_model)
            plan = decide(hardware, override)
            cfg = build_config(plan.device, overrides, args)
    except (data.DataError, config.ConfigError, PathError) as exc:
        log.error("cannot start:\n%s", exc)
        return EXIT_BAD_INPUT
    log.info("%d train rows, %d intents, %d val rows", len(train_rows), len(data.taxonomy(train_rows)), len(val_rows))
    log.info("plan: %s", plan.describe())

    if plan.model == BUNDLED:
        os.environ["HF_HUB_OFFLINE"] = "1"  # the default CPU path never touches a hub, embedder included

    from tickettune import predict, retrieval  # heavy imports after validation
    from tickettune.embeddings import embed
    from tickettune.results import TrainingStats, write_results

    with clock.stage("embed"):
        index = retrieval.RetrievalIndex.fit(train_rows, embed([r.ticket for r in train_rows]),
                                             embed([r.ideal_reply for r in train_rows]))
        val_vectors = embed([r.ticket for r in val_rows])
    done: dict = {}  # what the model stages finished: "result" (training), "predictions"
    problems: list[str] = []  # failures that cost an output other than the results file
    try:
        adapt_and_predict(args, clock, plan, cfg, hardware, override, overrides, train_rows, val_rows, index,
                          val_vectors, done, problems)
    except NamedModelError as exc:
        log.error("cannot load the model you named: %s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never lose the predictions
        log.exception("a model stage failed: writing retrieval-only predictions instead")
        done["predictions"] = predict.retrieval_only(index, val_rows, val_vectors)
        problems.append("retrieval-only predictions (embedding intent, nearest train reply) because "
                        + f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
    result, predictions = done.get("result"), done["predictions"]
    stats = TrainingStats(result.steps, result.train_loss, result.val_loss, clock.elapsed()) if result else \
        TrainingStats(0, float("nan"), float("nan"), clock.elapsed())
    write_results(args.output, stats, predictions)
    log.info("wrote %d predictions to %s in %.1f s (%s)", len(predictions), args.output, clock.elapsed(),
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.stages.items()))
    for problem in problems:
        log.error("DEGRADED RUN: %s", problem)
    return 0


class NamedModelError(RuntimeError):
    """The model named by --base-model / $TICKETTUNE_BASE_MODEL could not be loaded."""


def adapt_and_predict(args, clock, plan, cfg, hardware, override, overrides, train_rows, val_rows, index,
                      val_vectors, done: dict, problems: list[str]) -> None:
    """Load the base model, train the adapters, save them, predict. Fills `done` as stages finish
    (so a later failure keeps the training stats); an output other than the predictions that
    cannot be written is a `problems` entry, not a reason to lose the predictions."""
    from tickettune import modeling, predict
    from tickettune.embeddings import load_embedder
    from tickettune.results import write_json_atomic, write_jsonl

    def best_effort(what: str, write) -> None:
        try:
            write()
        except Exception as exc:  # noqa: BLE001
            log.exception("could not write %s", what)
            problems.append(f"{what} not written ({type(exc).__name__}: {exc})".splitlines()[0])

    modeling.seed_everything(cfg.seed, plan.device)
    with clock.stage("load model"):
        try:
            model, tokenizer, loaded = modeling.load_first([plan] + fallbacks(plan, hardware, override))
        except Exception as exc:
            if override:
                raise NamedModelError(f"{override}: {type(exc).__name__}: {exc}") from None
            raise
    if loaded != plan:  # a fallback: its device's defaults (the overrides were validated above)
        plan, cfg = loaded, build_config(loaded.device, overrides, args)
    with clock.stage("train"):
        modeling.seed_everything(cfg.seed, plan.device)  # PEFT initialises LoRA from the global RNG
        model = modeling.add_lora(model, cfg.train)
        result, lm_weight, held = fit_adapters(model, tokenizer, train_rows, index, cfg, plan,
                                               deadline=clock.start + cfg.budget_s - reserve_s(plan, val_rows))
        done["result"] = result
    with clock.stage("save adapter"):
        meta = run_metadata(plan, cfg, index, held, result, lm_weight, load_embedder().name)
        best_effort(f"the adapter in {args.weights}",
                    lambda: modeling.save_adapter(model, tokenizer, args.weights, meta))
        best_effort("loss_history.json", lambda: write_json_atomic(Path(args.weights) / "loss_history.json",
                                                                   result.history))
    with clock.stage("predict"):
        with modeling.autocast(plan):
            predictions, diagnostics = predict.predict(model, tokenizer, index, val_rows, val_vectors, cfg.infer,
                                                       lm_weight, deadline=clock.start + cfg.budget_s - 10)
        done["predictions"] = predictions
        best_effort("diagnostics.jsonl", lambda: write_jsonl(Path(args.weights) / "diagnostics.jsonl", diagnostics))
    if plan.device == "cuda":
        import torch

        log.info("peak GPU memory %.1f GB", torch.cuda.max_memory_allocated() / 2**30)


class PathError(ValueError):
    pass


def reserve_s(plan, val_rows: list) -> float:
    """Seconds kept for prediction when training checks the budget (pessimistic per-row cost)."""
    return 15 + INFER_S_PER_ROW[plan.device] * len(val_rows)


def fit_adapters(model, tokenizer, train_rows, index, cfg, plan, deadline: float):
    """Build both tasks' sequences, train the intent and reply adapters, calibrate the ensemble.
    Returns (TrainResult, ensemble LM weight, held-out rows)."""
    from tickettune import intent, modeling, train
    from tickettune.embeddings import embed

    references = [[train_rows[j].ideal_reply for j in index.nearest(v, r.intent, cfg.infer.n_references, exclude=i)]
                  for i, (r, v) in enumerate(zip(train_rows, index.vectors))]
    labels_in_prompt = list(index.labels) if cfg.infer.list_labels else None
    seqs = train.build_sequences(train_rows, tokenizer, cfg.train, references, labels_in_prompt,
                                 cfg.infer.max_ticket_tokens, cfg.seed)
    held = train.holdout_rows(train_rows, cfg.train.holdout_frac, cfg.seed)
    calibration = intent.HeldOutCalibration(tokenizer, train_rows, held, index.vectors, index.replies,
                                            cfg.infer.score_batch_size, cfg.infer.list_labels,
                                            lambda: modeling.autocast(plan), cfg.train.augment_copies, cfg.seed, embed)
    calibrate = cfg.infer.calibrate_lm_weight
    result = train.fit(model, tokenizer, seqs, held, cfg.train, cfg.seed, deadline=deadline,
                       autocast=lambda: modeling.training_context(plan),
                       on_intent_trained=calibration if calibrate else None)
    lm_weight = calibration.weight(cfg.infer.lm_weight) if calibrate else cfg.infer.lm_weight
    log.info("%d steps, %d tokens, train_loss %.4f, val_loss %.4f (%d held-out rows), ensemble lm_weight %.2f",
             result.steps, result.tokens, result.train_loss, result.val_loss, len(held), lm_weight)
    return result, lm_weight, held


def load_inputs(train_path: str, val_path: str) -> tuple[list[data.Example], list[data.Ticket]]:
    """Both files, validated; problems of both are reported together."""
    problems: list[str] = []
    loaded = []
    for loader, path in ((data.load_train, train_path), (data.load_val, val_path)):
        try:
            loaded.append(loader(path))
        except data.DataError as exc:
            problems += exc.problems
    if problems:
        raise data.DataError(problems)
    return loaded[0], loaded[1]


def check_paths(weights: Path, output: Path) -> None:
    """Create the output folder; refuse an unwritable weights folder — before any model loads."""
    problems = []
    for folder, what in ((weights, "--weights"), (output.parent, "--output folder")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".tickettune-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            problems.append(f"{what} {folder}: not writable ({exc.strerror or exc})")
    if output.is_dir():
        problems.append(f"--output {output}: is a folder, expected a file path")
    if problems:
        raise PathError("\n".join(problems))


def build_config(device: str, overrides: dict, args: argparse.Namespace) -> config.RunConfig:
    seed = args.seed if args.seed is not None else os.environ.get("TICKETTUNE_SEED")
    flags = {k: v for k, v in (("seed", seed), ("budget_s", args.budget_s)) if v is not None}
    if "seed" in flags:
        flags["seed"] = int(flags["seed"])
    return config.RunConfig.for_plan(device, {**overrides, **flags})


def run_metadata(plan, cfg, index, held, result, lm_weight: float, embedder: str) -> dict:
    import peft
    import torch
    import transformers

    from tickettune import prompts

    return {
        "tickettune": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "plan": plan.to_dict(), "config": cfg.to_dict(), "taxonomy": list(index.labels),
        "embedder": embedder, "embedding_temperature": index.temperature, "holdout_rows": sorted(held),
        "lm_weight": lm_weight,
        "steps": result.steps, "stopped_early": result.stopped_early,
        "prompts": {"intent_system": prompts.INTENT_SYSTEM, "reply_system": prompts.REPLY_SYSTEM},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "loss_history": "loss_history.json",
    }


if __name__ == "__main__":
    sys.exit(main())
