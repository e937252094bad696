"""The training recipe: from a loaded base model and the train rows to a `TicketModel`.

Phases, in order (each a call below, none hidden in a callback):
1. attach two fresh LoRA adapters (seeded: PEFT initialises them from the global RNG);
2. train the *intent* adapter on ticket -> label (+ noisy copies), never on the held-out rows;
3. calibrate: score the held-out rows (+ noisy copies) with it, and choose the ensemble's LM
   weight by their log-likelihood against an embedding classifier fitted without them;
4. train the *reply* adapter on retrieved replies + ticket -> ideal reply (the held-out rows
   join after its first epoch, when its val_loss is measured).
See `train` for the loop and val_loss, `intent` for the ensemble. Does not load or save models.
"""

from __future__ import annotations

import logging

from tickettune.pipeline import intent, modeling, train
from tickettune.pipeline.config import RunConfig
from tickettune.pipeline.embeddings import embed, load_embedder
from tickettune.pipeline.plan import Plan
from tickettune.pipeline.results import TrainingStats
from tickettune.pipeline.retrieval import RetrievalIndex
from tickettune.pipeline.ticket_model import TicketModel

log = logging.getLogger(__name__)


def fit(base, tokenizer, plan: Plan, cfg: RunConfig, index: RetrievalIndex,
        deadline: float | None = None) -> TicketModel:
    """Train both adapters on `base` (which becomes the PeftModel inside the result), calibrate the
    ensemble on the held-out rows, and return the trained `TicketModel`. Training stops early at
    `deadline` (monotonic s). The caller, who owns the clock, fills in `training.wall_clock_s`."""
    examples = list(index.examples)
    modeling.seed_everything(cfg.seed, plan.device)  # PEFT initialises LoRA from the global RNG
    model = modeling.add_lora(base, cfg.train)
    seqs = train.build_sequences(examples, tokenizer, cfg.train, reference_replies(index, cfg.infer.n_references),
                                 list(index.labels) if cfg.infer.list_labels else None,
                                 cfg.infer.max_ticket_tokens, cfg.seed)
    held = train.holdout_rows(examples, cfg.train.holdout_frac, cfg.seed)
    run = dict(cfg=cfg.train, seed=cfg.seed, deadline=deadline, autocast=lambda: modeling.training_context(plan))

    parts = []
    with modeling.adapter(model, modeling.INTENT_ADAPTER):
        parts.append(train.train(model, tokenizer, [s for s in seqs if s.task == "intent"], held,
                                 epochs=cfg.train.epochs, join=False, task="intent", **run))
    lm_weight = calibrate(model, tokenizer, plan, cfg, index, held) if cfg.infer.calibrate_lm_weight \
        else cfg.infer.lm_weight
    reply_seqs = [s for s in seqs if s.task == "reply"]
    if cfg.train.reply_epochs and reply_seqs:
        with modeling.adapter(model, modeling.REPLY_ADAPTER):
            parts.append(train.train(model, tokenizer, reply_seqs, held, epochs=cfg.train.reply_epochs,
                                     join=True, task="reply", **run))
    result = train.combine(parts)
    log.info("%d steps, %d tokens, train_loss %.4f, val_loss %.4f (%d held-out rows), ensemble lm_weight %.2f",
             result.steps, result.tokens, result.train_loss, result.val_loss, len(held), lm_weight)
    stats = TrainingStats(result.steps, result.train_loss, result.val_loss, wall_clock_s=float("nan"))
    return TicketModel(plan, cfg, model, tokenizer, index, lm_weight, load_embedder().name, stats,
                       info={"holdout_rows": sorted(held), "stopped_early": result.stopped_early},
                       history=result.history)


def reference_replies(index: RetrievalIndex, k: int) -> list[list[str]]:
    """Per train row, the `k` most relevant other replies of its intent: the reply task's references."""
    return [[index.examples[j].ideal_reply for j in index.nearest(v, e.intent, k, exclude=i)]
            for i, (e, v) in enumerate(zip(index.examples, index.vectors))]


def calibrate(model, tokenizer, plan: Plan, cfg: RunConfig, index: RetrievalIndex, held: set[int]) -> float:
    """The ensemble's LM weight, chosen on the held-out rows that the intent adapter never saw
    (`cfg.infer.lm_weight` when there are none, or a single intent)."""
    if not held or len(index.labels) < 2:
        return cfg.infer.lm_weight
    texts, gold = intent.heldout_queries(list(index.examples), held, cfg.train.augment_copies, cfg.seed)
    with modeling.autocast(plan), modeling.adapter(model, modeling.INTENT_ADAPTER):
        lm_logp = intent.score_labels(model, tokenizer, texts, list(index.labels), cfg.infer.score_batch_size,
                                      cfg.infer.list_labels)
    emb_logp = index.without(held).intent_logprobs(embed(texts))
    return intent.choose_lm_weight(lm_logp, emb_logp, gold)
