"""The calibration phase of `fit`: the intent ensemble's weights, measured on the held-out rows
(`intent.ensemble_weights` decides from the experts' held-out scores)."""

from __future__ import annotations

import logging

from tickettune.pipeline import intent, modeling
from tickettune.pipeline.config import RunConfig
from tickettune.pipeline.embeddings import embed
from tickettune.pipeline.encoder import IntentEncoder
from tickettune.pipeline.ticket_model import TicketModel

log = logging.getLogger(__name__)


def lm_scores_matter(cfg: RunConfig) -> bool:
    """Whether the LM's label scores can change an answer: not when its intent weight is fixed at 0
    (`infer.calibrate_lm_weight` false and `infer.lm_weight` 0, the CPU plan's default), where neither
    calibration nor prediction scores labels, so the run does not time scoring either."""
    return cfg.infer.calibrate_lm_weight or cfg.infer.lm_weight > 0


def calibrate(model: TicketModel, held: set[int], *, encoder: IntentEncoder | None,
              lm_trained: bool) -> dict[str, float]:
    """The intent ensemble's weights (`intent.ensemble_weights`): the embedding experts
    (`intent.weighed_experts`: the prototypes only when the desk's replies are there) at equal
    weight (the fine-tuned intent `encoder` among them when there is one), and the LM at a weight
    its held-out scores earn beyond chance, or 0. The held-out rows (and noisy copies of them) were
    never seen by the encoder, its head or the intent adapter; the frozen experts are refitted
    without them. Without held-out rows there is nothing to measure:
    the LM, whose worth is unknown, gets no weight.
    `infer.calibrate_lm_weight` false fixes the LM's weight at `infer.lm_weight`."""
    cfg, index = model.config, model.index
    fixed_lm = None if cfg.infer.calibrate_lm_weight else cfg.infer.lm_weight
    replies_said = any(e.ideal_reply.strip() for e in index.examples)
    names = intent.weighed_experts(replies_said, encoder is not None)
    if not held or len(index.labels) < 2:
        return intent.prior_weights(names, replies_said) | {
            "lm": fixed_lm if fixed_lm is not None and lm_trained else 0.0}
    texts, gold, rows = intent.heldout_queries(list(index.examples), held, cfg.train.augment_copies, cfg.seed)
    rest, vectors = index.without(held), embed(texts)
    scorers = {"proto": lambda: rest.intent_logprobs(vectors), "logreg": lambda: rest.linear_logprobs(vectors),
               "encoder": lambda: encoder.logprobs(texts)}
    experts = {n: scorers[n]() for n in names}
    if lm_trained and fixed_lm is None:
        only = intent.candidates(experts, {n: 1.0 for n in experts})
        with modeling.autocast(model.plan), modeling.adapter(model.model, modeling.INTENT_ADAPTER):
            experts["lm"] = intent.score_labels(model.model, model.tokenizer, texts, list(index.labels),
                                                cfg.infer.score_batch_size, cfg.infer.list_labels, only=only)
    weights = intent.ensemble_weights(experts, gold, rows, replies_said)
    if fixed_lm is not None or "lm" not in weights:
        weights["lm"] = fixed_lm if fixed_lm is not None and lm_trained else 0.0
    accuracy = {n: round(float((e.argmax(1) == gold).mean()), 3) for n, e in experts.items()}
    log.info("intent ensemble: weights %s (held-out accuracy alone: %s over %d queries)", weights, accuracy, len(gold))
    return weights
