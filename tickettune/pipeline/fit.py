"""The training recipe: from a loaded base model and the train rows to a `TicketModel`.

Phases, in order (each a call below, none hidden in a callback):
1. attach two fresh LoRA adapters (seeded: PEFT initialises them from the global RNG);
2. train the *intent* adapter on ticket -> label (+ noisy copies), never on the held-out rows;
3. calibrate: score the held-out rows (+ noisy copies) with it, and choose the ensemble's LM
   weight by their log-likelihood against an embedding classifier fitted without them;
4. train the *reply* adapter on retrieved replies + ticket -> ideal reply, also never on the
   held-out rows;
5. choose the reply policy from evidence the run measures itself (`replies`): how many sentences
   a composed reply borrows, leave-one-out over the train rows; then whether the reply adapter
   writes replies at all: it generates for the held-out rows, and its grounded generations must
   beat the composed replies there by `replies.proxy_quality`, beyond chance (a one-sided paired
   t-test at 5 %, `replies.generation_wins`), or the run composes. So a 135M model
   on a CPU may compose where a 7B model on a GPU generates, with no setting changed.
See `train` for the loop and val_loss, `intent` for the ensemble. Does not load or save models.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np

from tickettune.pipeline import intent, modeling, prompts, replies, train
from tickettune.pipeline.config import RunConfig
from tickettune.pipeline.embeddings import embed, load_embedder
from tickettune.pipeline.plan import Plan
from tickettune.pipeline.replies import ReplyPolicy
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
    trained = TicketModel(plan, cfg, None, tokenizer, index, cfg.infer.lm_weight, load_embedder().name)
    modeling.seed_everything(cfg.seed, plan.device)  # PEFT initialises LoRA from the global RNG
    model = trained.model = modeling.add_lora(base, cfg.train)
    seqs = train.build_sequences(examples, tokenizer, cfg.train, reference_replies(trained, cfg.infer.n_references),
                                 list(index.labels) if cfg.infer.list_labels else None,
                                 cfg.infer.max_ticket_tokens, cfg.seed)
    held = train.holdout_rows(examples, cfg.train.holdout_frac, cfg.seed)
    run = dict(cfg=cfg.train, seed=cfg.seed, deadline=deadline, autocast=lambda: modeling.training_context(plan))

    parts = []
    with modeling.adapter(model, modeling.INTENT_ADAPTER):
        parts.append(train.train(model, tokenizer, [s for s in seqs if s.task == "intent"], held,
                                 epochs=cfg.train.epochs, join=False, task="intent", **run))
    if cfg.infer.calibrate_lm_weight:
        trained.lm_weight = calibrate(model, tokenizer, plan, cfg, index, held)
    reply_seqs = [s for s in seqs if s.task == "reply"]
    if cfg.train.reply_epochs and reply_seqs:
        with modeling.adapter(model, modeling.REPLY_ADAPTER):
            parts.append(train.train(model, tokenizer, reply_seqs, held, epochs=cfg.train.reply_epochs,
                                     join=False, task="reply", **run))
    result = train.combine(parts)
    log.info("%d steps, %d tokens, train_loss %.4f, val_loss %.4f (%d held-out rows), ensemble lm_weight %.2f",
             result.steps, result.tokens, result.train_loss, result.val_loss, len(held), trained.lm_weight)
    trained.training = TrainingStats(result.steps, result.train_loss, result.val_loss, wall_clock_s=float("nan"))
    trained.info = {"holdout_rows": sorted(held), "stopped_early": result.stopped_early}
    trained.history = result.history
    trained.reply_policy = choose_reply_policy(trained, held, deadline)
    return trained


def reference_replies(model: TicketModel, k: int) -> list[list[str]]:
    """Per train row, the `k` most relevant other replies of its intent: the reply task's references."""
    bank, examples = model.bank, model.index.examples
    return [[bank.replies[j] for j in bank.rank(v, e.ticket, e.intent, exclude=i)[:k]]
            for i, (e, v) in enumerate(zip(examples, model.index.vectors))]


def choose_reply_policy(model: TicketModel, held: set[int], deadline: float | None = None) -> ReplyPolicy:
    """The run's reply policy (see the module docstring), with the numbers it was chosen by."""
    bank, examples, forced = model.bank, model.index.examples, model.config.infer.reply_source
    k, loo = replies.choose_extra_sentences(bank, [e.ticket for e in examples], embed)
    evidence: dict = {"extra_sentences_loo": {str(n): q for n, q in loo.items()}}
    if forced != "auto":
        return ReplyPolicy(forced, k, evidence | {"source": f"set by infer.reply_source={forced}"})
    if not held:
        return ReplyPolicy("generate", k, evidence | {"source": "no held-out rows to measure on: generate"})
    if deadline is not None and time.monotonic() > deadline:
        return ReplyPolicy("retrieve", k, evidence | {"source": "no time left to measure generation: compose"})
    rows = sorted(held)
    ranked = [bank.rank(model.index.vectors[i], examples[i].ticket, examples[i].intent, exclude=i) for i in rows]
    model.reply_policy = ReplyPolicy("generate", k)
    texts = [prompts.truncate_ticket(model.tokenizer, examples[i].ticket, model.config.infer.max_ticket_tokens)[0]
             for i in rows]
    with modeling.autocast(model.plan):
        written = model.write_replies(texts, [examples[i].ticket for i in rows], model.index.vectors[rows], ranked)
    generated = [grounded.reply for _, grounded in written]
    composed = [bank.compose(model.index.vectors[i], r, k) for i, r in zip(rows, ranked)]
    vectors = embed(generated + composed)
    pairs = [(replies.proxy_quality(g, bank.replies[i], gv, bank.reply_vectors[i]),
              replies.proxy_quality(c, bank.replies[i], cv, bank.reply_vectors[i]))
             for g, c, gv, cv, i in zip(generated, composed, vectors[:len(rows)], vectors[len(rows):], rows)]
    source = "generate" if replies.generation_wins(pairs) else "retrieve"
    means = np.mean(pairs, axis=0)
    log.info("reply policy: %s (held-out proxy quality: generated %.3f, composed %.3f over %d rows; "
             "composed replies borrow up to %d sentences)", source, means[0], means[1], len(rows), k)
    return ReplyPolicy(source, k, evidence | {"heldout_rows": len(rows),
                                              "heldout_proxy_quality": {"generate": round(float(means[0]), 4),
                                                                        "retrieve": round(float(means[1]), 4)},
                                              "heldout_pairs": [[round(g, 4), round(c, 4)] for g, c in pairs],
                                              "heldout_actions": dict(Counter(g.action for _, g in written))})


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
