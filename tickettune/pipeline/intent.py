"""Intent prediction: label log-likelihoods under the fine-tuned model, combined with the
embedding classifier. The answer is always one of the train intents.

Label scoring shares each ticket's prompt: the prompts of a batch run once (left padded), their
KV cache is repeated once per label, and only the label tokens run again. A label's score is the
summed log-probability of its tokens *and* the end-of-turn marker, so a label that is a prefix of
another ("billing" vs "billing.refund") is not favoured, and the sum (not the mean) keeps it a
proper likelihood; softmax over labels then gives log P(label | ticket) for the ensemble.
"""

from __future__ import annotations

import logging
import random

import numpy as np
from tickettune.pipeline import prompts
from tickettune.pipeline.augment import noisy_copies
from tickettune.pipeline.data import Example
from tickettune.pipeline.likelihood import continuation_logprobs
from tickettune.pipeline.retrieval import log_softmax

log = logging.getLogger(__name__)

LM_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def choose_lm_weight(lm_logp: np.ndarray, emb_logp: np.ndarray, gold: np.ndarray,
                     grid: tuple[float, ...] = LM_WEIGHTS) -> float:
    """The LM weight whose ensemble gives the held-out rows' true intents the highest mean
    log-likelihood (emb weight 1). Ties go to the smaller weight. (Q, C), (Q, C), (Q,) -> w.

    >>> emb = np.log([[0.3, 0.7], [0.6, 0.4]])
    >>> choose_lm_weight(np.log([[0.9, 0.1], [0.1, 0.9]]), emb, np.array([1, 0]))   # LM always wrong
    0.0
    >>> choose_lm_weight(np.log([[0.1, 0.9], [0.9, 0.1]]), emb, np.array([1, 0]))   # LM always right
    4.0
    """
    def loglik(w: float) -> float:
        return float(log_softmax(w * lm_logp + emb_logp)[np.arange(len(gold)), gold].mean())

    scores = [loglik(w) for w in grid]
    return grid[int(np.argmax(np.round(scores, 6)))]


def heldout_queries(examples: list[Example], held: set[int], copies: int, seed: int) -> tuple[list[str], np.ndarray]:
    """The held-out rows' tickets and `copies` noisy copies of each (so that robustness to
    paraphrase counts in the calibration), with their gold label indices over the taxonomy."""
    labels = sorted({e.intent for e in examples})
    rng = random.Random(seed + 1)
    texts, gold = [], []
    for i in sorted(held):
        for text in [examples[i].ticket] + noisy_copies(examples[i].ticket, copies, rng):
            texts.append(text)
            gold.append(labels.index(examples[i].intent))
    return texts, np.array(gold, dtype=np.int64)


def combine(lm_logp: np.ndarray, emb_logp: np.ndarray, lm_weight: float, emb_weight: float) -> np.ndarray:
    """Weighted product of experts in log space: (Q, C) x2 -> (Q,) argmax indices (first wins ties)."""
    score = lm_weight * lm_logp + emb_weight * emb_logp
    return np.argmax(np.round(score, 6), axis=1)  # rounding: ties break by label order, not float noise


def score_labels(model, tokenizer, tickets: list[str], labels: list[str], batch_size: int,
                 labels_in_prompt: bool = False) -> np.ndarray:
    """log P(label | ticket) under `model`, normalised over `labels`. Returns (Q, C) float64."""
    shown = labels if labels_in_prompt else None
    # the label token ids do not depend on the ticket: render them once against a dummy prompt
    label_ids = [prompts.render(tokenizer, prompts.intent_messages("x", shown), lab)[1] for lab in labels]
    encoded = [prompts.render(tokenizer, prompts.intent_messages(t, shown))[0] for t in tickets]
    scores = continuation_logprobs(model, encoded, [label_ids] * len(encoded), tokenizer.pad_token_id, batch_size,
                                   desc="intent")
    return log_softmax(np.array(scores, dtype=np.float64).reshape(len(tickets), len(labels)))
