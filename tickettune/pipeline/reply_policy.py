"""The reply-policy phase of `fit`: from evidence the run measures itself, how many sentences a
composed reply borrows (leave-one-out over the train rows, `replies.choose_extra_sentences`), and
whether the reply adapter writes replies at all: it generates for the held-out rows, and its
grounded generations must beat the composed replies there by `replies.proxy_quality`, beyond
chance (`replies.generation_wins`), or the run retrieves: composes (`infer.reply_source` AUTO; a
GENERATE or RETRIEVE setting decides without measuring; the words: `replies.REPLY_SOURCES`)."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from tickettune.pipeline import modeling, prompts, replies
from tickettune.pipeline.embeddings import embed
from tickettune.pipeline.replies import AUTO, GENERATE, HELDOUT_REPLIES, RETRIEVE, ReplyPolicy
from tickettune.pipeline.ticket_model import TicketModel

log = logging.getLogger(__name__)


def choose_reply_policy(model: TicketModel, held: set[int], deadline: float | None = None) -> ReplyPolicy:
    """The run's reply policy (see the module docstring), with the numbers it was chosen by. Generation
    is measured on at most HELDOUT_REPLIES held-out rows; a row whose generation would end after
    `deadline` is not generated and counts as no gain."""
    bank, examples, forced = model.bank, model.index.examples, model.config.infer.reply_source
    k, loo = replies.choose_extra_sentences(bank, [e.ticket for e in examples], embed)
    evidence: dict = {"extra_sentences_loo": {str(n): q for n, q in loo.items()}}
    if forced != AUTO:
        return ReplyPolicy(forced, k, evidence | {"source": f"set by infer.reply_source={forced}"})
    if not held:  # e.g. one row per intent, where generation measured level with composing or above (README)
        return ReplyPolicy(GENERATE, k, evidence | {"source": "no held-out rows to measure on: generate"})
    rows = sorted(held)[:HELDOUT_REPLIES]
    ranked = [bank.rank(model.index.vectors[i], examples[i].ticket, examples[i].intent, exclude=i) for i in rows]
    texts = [prompts.truncate_ticket(model.tokenizer, examples[i].ticket, model.config.infer.max_ticket_tokens)[0]
             for i in rows]
    with modeling.autocast(model.plan):
        written = model.write_replies(texts, [examples[i].ticket for i in rows], model.index.vectors[rows], ranked,
                                      deadline, policy=ReplyPolicy(GENERATE, k))
    generated = [grounded.reply for _, grounded in written]
    composed = [bank.compose(model.index.vectors[i], r, k, examples[i].ticket) for i, r in zip(rows, ranked)]
    vectors = embed(generated + composed)
    pairs = [(replies.proxy_quality(g, bank.replies[i], gv, bank.reply_vectors[i]),
              replies.proxy_quality(c, bank.replies[i], cv, bank.reply_vectors[i]))
             for g, c, gv, cv, i in zip(generated, composed, vectors[:len(rows)], vectors[len(rows):], rows)]
    source = GENERATE if replies.generation_wins(pairs) else RETRIEVE
    means = np.mean(pairs, axis=0)
    log.info("reply policy: %s (held-out proxy quality: generate %.3f, retrieve (composed) %.3f over %d rows; "
             "composed replies borrow up to %d sentences)", source, means[0], means[1], len(rows), k)
    return ReplyPolicy(source, k, evidence | {"heldout_rows": len(rows),
                                              "heldout_proxy_quality": {GENERATE: round(float(means[0]), 4),
                                                                        RETRIEVE: round(float(means[1]), 4)},
                                              "heldout_pairs": [[round(g, 4), round(c, 4)] for g, c in pairs],
                                              "heldout_actions": dict(Counter(g.action for _, g in written))})
