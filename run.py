#!/usr/bin/env python
"""tickettune: fine-tune a base LLM with LoRA on labelled support tickets, then predict an intent
and a reply for every val ticket, in one invocation.

    python run.py --train train.jsonl --val val.jsonl --weights WEIGHTS_DIR --output results.json

Stages: validate inputs -> plan hardware -> embed -> load base model -> train LoRA -> save the
model -> predict -> write results. See README.md. Should a model stage fail, the results are still
written, from retrieval alone, with an ERROR in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from tickettune.pipeline import runlog  # stdlib only: safe before the defaults below

runlog.set_process_defaults()  # before torch starts: passive OpenMP waits, deterministic cuBLAS

from tickettune import __version__  # noqa: E402
from tickettune.pipeline import config, data  # noqa: E402
from tickettune.pipeline.embeddings import (EncoderUnavailable, check_available, hub_allowed,  # noqa: E402
                                             resolve_encoder, select_encoder)
from tickettune.pipeline.results import folder_problem  # noqa: E402
from tickettune.pipeline.plan import (BUNDLED, ENV_MODEL, Hardware, Plan, decide, detect_hardware,  # noqa: E402
                                      fallbacks, model_override)

log = logging.getLogger("tickettune")
EXIT_BAD_INPUT = 2
END_MARGIN_S = 5.0  # the budget's last seconds: writing the results and the diagnostics, leaving the process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="labelled JSONL: id, ticket, intent, ideal_reply")
    p.add_argument("--val", required=True, help="input JSONL: id, ticket")
    p.add_argument("--weights", required=True, help="folder for the adapters, tokenizer and run metadata (created if missing)")
    p.add_argument("--output", required=True, help="results JSON file (written atomically)")
    p.add_argument("--seed", type=int, default=None, help="seed for everything (else $TICKETTUNE_SEED, else 0)")
    p.add_argument("--base-model", default=None,
                   help=f"hub id or local folder; else ${ENV_MODEL}; else chosen by hardware")
    p.add_argument("--encoder", default=None, choices=config.ENCODER_CHOICES,
                   help=f"sentence encoder under retrieval and the intent encoder; else ${config.ENV_ENCODER}; "
                   f"else the config's encoder.model; else {config.DEFAULT_ENCODER}: mpnet where scripts/setup.sh "
                   "has set it up (off the CPU plan: or the hub has it), else minilm")
    p.add_argument("--config", default=None, help="JSON file overriding settings, e.g. {\"train\": {\"epochs\": 2}}")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget for the whole run (default 1500)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"tickettune {__version__}")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Job:
    """What the run was asked to do, validated: the rows, the outputs, the plan and its settings."""
    train_rows: list[data.Example]
    val_rows: list[data.Ticket]
    weights: Path
    output: Path
    hardware: Hardware
    override: str | None        # the model named by --base-model / $TICKETTUNE_BASE_MODEL
    plan: Plan
    cfg: config.RunConfig
    overrides: dict             # --config, --seed, --budget-s, --encoder: to rebuild the settings for a fallback plan

    def config_for(self, plan: Plan) -> config.RunConfig:
        """`plan`'s device defaults with the user's overrides (validated in `prepare`)."""
        return config.RunConfig.for_plan(plan.device, self.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runlog.setup(args.verbose)
    clock = runlog.Clock()
    try:
        job = prepare(args, clock)
    except (data.DataError, config.ConfigError, PathError, EncoderUnavailable) as exc:
        log.error("cannot start:\n%s", exc)
        return EXIT_BAD_INPUT
    log.info("%d train rows, %d intents, %d val rows", len(job.train_rows), len(data.taxonomy(job.train_rows)),
             len(job.val_rows))
    log.info("plan: %s; sentence encoder %s", job.plan.describe(), job.cfg.encoder.model)
    if job.plan.model == BUNDLED:
        os.environ["HF_HUB_OFFLINE"] = "1"  # the default CPU path never touches a hub, embedder included

    from tickettune.pipeline.results import TrainingStats, write_results  # heavy imports after validation
    from tickettune.pipeline.ticket_model import retrieval_only
    from tickettune.pipeline.weights_folder import write_training

    with clock.stage("embed"):
        index = embed_train_rows(job.train_rows, job.cfg.encoder.label_names)
    model, predictions, problems = None, None, []  # problems: outputs lost, other than the results file
    try:
        model = train_and_save(job, clock, index, problems)
        with clock.stage("predict"):
            predictions = predict_and_log(job, clock, model, problems)
    except NamedModelError as exc:
        log.error("cannot load the model you named: %s", exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never lose the predictions
        log.exception("a model stage failed: writing retrieval-only predictions instead")
        predictions = retrieval_only(index, job.val_rows)
        problems.append("retrieval-only predictions (embedding intent, nearest train reply) because "
                        + f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
    trained = model.training if model is not None else TrainingStats(0, float("nan"), float("nan"), 0.0)
    stats = TrainingStats(trained.steps, trained.train_loss, trained.val_loss, clock.elapsed())
    write_results(job.output, stats, predictions)
    if model is not None:
        best_effort(problems, f"the training record in {job.weights}", lambda: write_training(job.weights, stats))
    log.info("wrote %d predictions to %s in %.1f s (%s)", len(predictions), job.output, clock.elapsed(),
             ", ".join(f"{k} {v:.1f}s" for k, v in clock.stages.items()))
    for problem in problems:
        log.error("DEGRADED RUN: %s", problem)
    return 0


def prepare(args: argparse.Namespace, clock) -> Job:
    """Validate every input and pick the plan, before any model loads."""
    with clock.stage("validate"):
        train_rows, val_rows = load_inputs(args.train, args.val)
        overrides = config.load_overrides(args.config)
        check_paths(Path(args.weights), Path(args.output))
    with clock.stage("plan"):
        hardware, override = detect_hardware(), model_override(args.base_model)
        plan = decide(hardware, override)
        seed = args.seed if args.seed is not None else os.environ.get("TICKETTUNE_SEED")
        if isinstance(seed, str) and seed.strip().lstrip("-").isdigit():
            seed = int(seed)  # anything else reaches the config check and is reported there
        overrides |= {k: v for k, v in (("seed", seed), ("budget_s", args.budget_s)) if v is not None}
        overrides = config.with_encoder(overrides, args.encoder)  # --encoder > $TICKETTUNE_ENCODER > --config
        cfg = config.RunConfig.for_plan(plan.device, overrides)
        hub = plan.model != BUNDLED and hub_allowed()  # the CPU plan never uses the hub (main sets HF_HUB_OFFLINE)
        if cfg.encoder.model == config.AUTO_ENCODER:  # concrete from here on: a fallback plan and the saved model agree
            overrides = config.with_encoder(overrides, resolve_encoder(cfg.encoder.model, hub=hub))
            cfg = config.RunConfig.for_plan(plan.device, overrides)
        select_encoder(cfg.encoder.model)  # every embedding of this run, and the intent encoder's base
        check_available(cfg.encoder.model, hub=hub)  # before any model loads: without the hub, the folder must be here
    return Job(train_rows, val_rows, Path(args.weights), Path(args.output), hardware, override, plan, cfg, overrides)


def embed_train_rows(train_rows: list[data.Example], label_names: bool):
    """The retrieval index: train tickets, replies (and intent names) embedded, the embedding intent
    classifiers fitted."""
    from tickettune.pipeline.embeddings import embed
    from tickettune.pipeline.retrieval import RetrievalIndex

    return RetrievalIndex.build(train_rows, embed, label_names)


class NamedModelError(RuntimeError):
    """The model named by --base-model / $TICKETTUNE_BASE_MODEL could not be loaded."""


def train_and_save(job: Job, clock, index, problems: list[str]):
    """Load the base model (falling back per plan), train the adapters, save the model
    (best-effort: a model that cannot be written is a problem, not a reason to stop)."""
    from tickettune.pipeline import modeling
    from tickettune.pipeline.fit import fit

    modeling.seed_everything(job.cfg.seed, job.plan.device)
    with clock.stage("load model"):
        try:
            base, tokenizer, plan = modeling.load_first([job.plan] + fallbacks(job.plan, job.hardware, job.override))
        except Exception as exc:
            if job.override:
                raise NamedModelError(f"{job.override}: {type(exc).__name__}: {exc}") from None
            raise
    cfg = job.cfg if plan == job.plan else job.config_for(plan)  # a fallback: its device's defaults
    with clock.stage("train"):
        model = fit(base, tokenizer, plan, cfg, index, val_rows=len(job.val_rows), deadline=end_of(clock, cfg))
        model.training = replace(model.training, wall_clock_s=clock.elapsed())
    with clock.stage("save model"):
        best_effort(problems, f"the model in {job.weights}", lambda: model.save(job.weights))
    return model


def predict_and_log(job: Job, clock, model, problems: list[str]):
    """Every val row's prediction; the per-row diagnostics go to the weights folder (best-effort)."""
    from tickettune.pipeline.results import write_jsonl

    predictions, diagnostics = model.predict(job.val_rows, deadline=end_of(clock, model.config))
    best_effort(problems, "diagnostics.jsonl", lambda: write_jsonl(job.weights / "diagnostics.jsonl", diagnostics))
    if model.plan.device == "cuda":
        import torch

        log.info("peak GPU memory %.1f GB", torch.cuda.max_memory_allocated() / 2**30)
    return predictions


def best_effort(problems: list[str], what: str, write) -> None:
    """Run `write`; a failure is logged and becomes a `problems` entry instead of ending the run."""
    try:
        write()
    except Exception as exc:  # noqa: BLE001
        log.exception("could not write %s", what)
        problems.append(f"{what} not written ({type(exc).__name__}: {exc})".splitlines()[0])


class PathError(ValueError):
    pass


def end_of(clock, cfg: config.RunConfig) -> float:
    """When the model stages must be done (monotonic s) for the run to end within its budget."""
    return clock.start + cfg.budget_s - END_MARGIN_S


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
    """Create the output folders; refuse an unwritable one — before any model loads."""
    problems = [f"{what} {folder}: {why}" for folder, what in ((weights, "--weights"), (output.parent, "--output folder"))
                if (why := folder_problem(folder))]
    if output.is_dir():
        problems.append(f"--output {output}: is a folder, expected a file path")
    if problems:
        raise PathError("\n".join(problems))


if __name__ == "__main__":
    sys.exit(main())
