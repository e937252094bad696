"""Prediction for every val row: intent (ensemble), references (retrieval), reply (generation +
grounding). Exactly one `Prediction` per input row, in input order, whatever fails.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np

from tickettune import prompts
from tickettune.config import InferConfig
from tickettune.data import Ticket
from tickettune.generate import generate
from tickettune.grounding import Grounded, ground, prefer_generation
from tickettune.intent import combine, score_labels
from tickettune.modeling import INTENT_ADAPTER, end_of_turn_ids, merge_reply_adapter, use_adapter
from tickettune.results import Prediction
from tickettune.retrieval import RetrievalIndex

log = logging.getLogger(__name__)
KEY_FACT_REFERENCES = 3  # nearest same-intent replies consulted for the grounding check
FALLBACK_REPLY = "Thanks for reaching out! Our support team will follow up on your ticket shortly."


def predict(model, tokenizer, index: RetrievalIndex, val: list[Ticket], val_vectors: np.ndarray,
            cfg: InferConfig, lm_weight: float, deadline: float | None = None) -> tuple[list[Prediction], list[dict]]:
    """Predictions in input order, and one diagnostics record per row (scores, references, action).

    `model` is the trained PeftModel: the intent adapter scores labels, then the reply adapter
    (merged into the base weights when `cfg.merge_adapter`; `model` must not be reused after)
    writes the replies."""
    if not val:
        return [], []
    labels = list(index.labels)
    tickets = []
    for t in val:
        text, cut = prompts.truncate_ticket(tokenizer, t.ticket, cfg.max_ticket_tokens)
        if cut:
            log.warning("ticket %r is longer than %d tokens: truncated", t.id, cfg.max_ticket_tokens)
        if not text.strip():
            log.warning("ticket %r is empty: predicting from the empty text", t.id)
        tickets.append(text)

    t0 = time.perf_counter()
    emb_logp = index.intent_logprobs(val_vectors)
    if cfg.lm_weight + lm_weight > 0 and len(labels) > 1:  # scored even at weight 0: diagnostics
        use_adapter(model, INTENT_ADAPTER)
        lm_logp = score_labels(model, tokenizer, tickets, labels, cfg.score_batch_size, cfg.list_labels)
    else:
        lm_logp = np.zeros_like(emb_logp)
    chosen = combine(lm_logp, emb_logp, lm_weight, cfg.emb_weight)
    intents = [labels[c] for c in chosen]
    intent_s = (time.perf_counter() - t0) / len(val)
    log.info("intent scoring %.1f s (%d tickets x %d labels)", intent_s * len(val), len(val), len(labels))

    ref_rows = [index.nearest(v, intent, k=KEY_FACT_REFERENCES) for v, intent in zip(val_vectors, intents)]
    refs = [[index.examples[i].ideal_reply for i in rows] for rows in ref_rows]
    prompt_ids = [prompts.render(tokenizer, prompts.reply_messages(t, r[:cfg.n_references]))[0]
                  for t, r in zip(tickets, refs)]
    shown = labels if cfg.list_labels else None  # the intent prompt exactly as score_labels renders it
    intent_tokens = [len(prompts.render(tokenizer, prompts.intent_messages(t, shown))[0]) for t in tickets]
    t1 = time.perf_counter()
    stop_ids = end_of_turn_ids(model, tokenizer)
    model = merge_reply_adapter(model, cfg)
    generated = generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.gen_batch_size,
                         stop_ids, deadline)
    gen_s, new_tokens = time.perf_counter() - t1, sum(g.new_tokens for g in generated)
    log.info("generation %.1f s (%d new tokens, %.0f tokens/s)", gen_s, new_tokens, new_tokens / max(gen_s, 1e-9))

    grounded_all = [ground(g.text, g.finished, r, repair=cfg.repair_replies, ticket=t.ticket)
                    for t, g, r in zip(val, generated, refs)]
    if cfg.repair_replies:
        from tickettune.embeddings import embed

        vectors = embed([gr.reply or " " for gr in grounded_all])
        grounded_all = [gr if gr.action == "fallback" or not r or prefer_generation(v, index.replies[rows])
                        else Grounded(r[0].strip(), "fallback", "nearest reply has the higher consensus")
                        for gr, v, r, rows in zip(grounded_all, vectors, refs, ref_rows)]
    out, diagnostics, actions = [], [], Counter()
    for row, (t, intent, r, g, n_int, grounded) in enumerate(
            zip(val, intents, refs, generated, intent_tokens, grounded_all)):
        actions[grounded.action] += 1
        if grounded.action == "fallback":
            log.info("row %r: %s -> nearest retrieved reply", t.id, grounded.detail)
        reply = grounded.reply or FALLBACK_REPLY
        out.append(Prediction(
            id=t.id, prediction=reply, predicted_intent=intent,
            latency_ms=int(round((intent_s + g.seconds) * 1000)),
            tokens_used=int(n_int + g.prompt_tokens + g.new_tokens),
        ))
        diagnostics.append({
            "id": t.id, "intent": intent,
            "lm_logp": {lab: _json_number(x) for lab, x in zip(labels, lm_logp[row])},
            "emb_logp": {lab: _json_number(x) for lab, x in zip(labels, emb_logp[row])},
            "reply_action": grounded.action, "reply_detail": grounded.detail, "generated": g.text,
        })
    log.info("replies: %s", ", ".join(f"{k} {v}" for k, v in sorted(actions.items())))
    return out, diagnostics


def _json_number(x) -> float | None:
    """A score for the diagnostics file: rounded, None where not finite (strict JSON has no NaN)."""
    return round(float(x), 4) if np.isfinite(x) else None


def retrieval_only(index: RetrievalIndex, val: list[Ticket], val_vectors: np.ndarray) -> list[Prediction]:
    """The safety net when a model stage fails: the embedding classifier's intent and the nearest
    train reply of that intent, one per row, in input order (no model needed)."""
    labels = list(index.labels)
    chosen = index.intent_logprobs(val_vectors).argmax(1) if len(val) else []
    out = []
    for t, v, c in zip(val, val_vectors, chosen):
        rows = index.nearest(v, labels[c], k=1)
        reply = index.examples[rows[0]].ideal_reply.strip() if rows else FALLBACK_REPLY
        out.append(Prediction(id=t.id, prediction=reply, predicted_intent=labels[c], latency_ms=0, tokens_used=0))
    return out
