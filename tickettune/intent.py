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

import numpy as np
from tqdm import tqdm

from tickettune import prompts
from tickettune.modeling import free_memory, out_of_memory_error
from tickettune.retrieval import log_softmax

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


class HeldOutCalibration:
    """Hook for `train.fit`: once the intent adapter is trained (it never saw the held-out rows),
    score the held-out tickets — and noisy copies of them, so that robustness to paraphrase
    counts — with it; `weight()` then picks the ensemble's LM weight by their log-likelihood
    against an embedding classifier fitted without those rows."""

    def __init__(self, tokenizer, examples, held: set[int], tickets: np.ndarray, replies: np.ndarray,
                 batch_size: int, labels_in_prompt: bool, autocast, copies: int, seed: int, embed):
        import random

        from tickettune.augment import noisy_copies

        self.tokenizer, self.examples, self.rows = tokenizer, examples, sorted(held)
        self.tickets, self.replies, self.embed = tickets, replies, embed
        self.batch_size, self.labels_in_prompt, self.autocast = batch_size, labels_in_prompt, autocast
        self.labels = sorted({e.intent for e in examples})
        rng = random.Random(seed + 1)
        self.texts, self.gold = [], []
        for i in self.rows:
            for text in [examples[i].ticket] + noisy_copies(examples[i].ticket, copies, rng):
                self.texts.append(text)
                self.gold.append(self.labels.index(examples[i].intent))
        self.lm_logp: np.ndarray | None = None

    def __call__(self, model) -> None:
        if self.rows and len(self.labels) > 1:
            with self.autocast():
                self.lm_logp = score_labels(model, self.tokenizer, self.texts, self.labels, self.batch_size,
                                            self.labels_in_prompt)

    def weight(self, default: float) -> float:
        if self.lm_logp is None:
            return default
        from tickettune.retrieval import RetrievalIndex

        held = set(self.rows)
        keep = [i for i in range(len(self.examples)) if i not in held]
        index = RetrievalIndex.fit([self.examples[i] for i in keep], self.tickets[keep], self.replies[keep])
        emb_logp = index.intent_logprobs(self.embed(self.texts))
        return choose_lm_weight(self.lm_logp, emb_logp, np.array(self.gold))


def combine(lm_logp: np.ndarray, emb_logp: np.ndarray, lm_weight: float, emb_weight: float) -> np.ndarray:
    """Weighted product of experts in log space: (Q, C) x2 -> (Q,) argmax indices (first wins ties)."""
    score = lm_weight * lm_logp + emb_weight * emb_logp
    return np.argmax(np.round(score, 6), axis=1)  # rounding: ties break by label order, not float noise


def score_labels(model, tokenizer, tickets: list[str], labels: list[str], batch_size: int,
                 labels_in_prompt: bool = False) -> np.ndarray:
    """log P(label | ticket) under `model`, normalised over `labels`. Returns (Q, C) float64."""
    import torch

    device = next(model.parameters()).device
    shown = labels if labels_in_prompt else None
    # the label token ids do not depend on the ticket: render them once against a dummy prompt
    label_ids = [prompts.render(tokenizer, prompts.intent_messages("x", shown), lab)[1] for lab in labels]
    n_lab, width = len(labels), max(len(t) for t in label_ids)
    lab = torch.full((n_lab, width), tokenizer.pad_token_id, dtype=torch.long)
    lab_mask = torch.zeros((n_lab, width), dtype=torch.long)
    for j, t in enumerate(label_ids):
        lab[j, :len(t)] = torch.tensor(t)
        lab_mask[j, :len(t)] = 1
    lab, lab_mask = lab.to(device), lab_mask.to(device)

    out = np.zeros((len(tickets), n_lab), dtype=np.float64)
    bar = tqdm(total=len(tickets), desc="intent", unit="ticket", leave=False, disable=None)
    for start in range(0, len(tickets), batch_size):
        chunk = tickets[start:start + batch_size]
        encoded = [prompts.render(tokenizer, prompts.intent_messages(t, shown))[0] for t in chunk]
        scores = _score_or_split(model, encoded, lab, lab_mask, tokenizer.pad_token_id)
        if not np.isfinite(scores).all():  # some GPU attention kernels give NaN on left-padded rows
            scores = np.concatenate([_score_or_split(model, [e], lab, lab_mask, tokenizer.pad_token_id)
                                     for e in encoded])
        out[start:start + len(chunk)] = scores
        bar.update(len(chunk))
    bar.close()
    return log_softmax(out)


def _score_or_split(model, encoded: list[list[int]], lab, lab_mask, pad_id: int) -> np.ndarray:
    """`_score_chunk`, halving the batch when it runs out of GPU memory; a single ticket that still
    does not fit gets equal scores for every label (the embedding classifier then decides)."""
    try:
        return _score_chunk(model, encoded, lab, lab_mask, pad_id)
    except out_of_memory_error():
        pass  # handled outside the handler, so that the traceback's tensors can be freed
    free_memory()
    if len(encoded) == 1:
        log.warning("label scoring ran out of memory for one ticket: the embedding classifier decides it")
        return np.zeros((1, lab.shape[0]))
    half = len(encoded) // 2
    log.warning("label scoring ran out of memory for %d tickets: retrying in halves", len(encoded))
    return np.concatenate([_score_or_split(model, encoded[:half], lab, lab_mask, pad_id),
                           _score_or_split(model, encoded[half:], lab, lab_mask, pad_id)])


def _score_chunk(model, encoded: list[list[int]], lab, lab_mask, pad_id: int) -> np.ndarray:
    import torch

    device = lab.device
    b, n_lab, width = len(encoded), lab.shape[0], lab.shape[1]
    plen = max(len(e) for e in encoded)
    ids = torch.full((b, plen), pad_id, dtype=torch.long)
    mask = torch.zeros((b, plen), dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding: every prompt ends at the same column
        ids[i, plen - len(e):] = torch.tensor(e)
        mask[i, plen - len(e):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        cache.batch_repeat_interleave(n_lab)                                 # (B*L, ...)
        last = torch.log_softmax(first.logits[:, -1].float(), dim=-1)        # (B, V)
        lab_ids = lab.repeat(b, 1)                                            # (B*L, W)
        lab_m = lab_mask.repeat(b, 1)
        full_mask = torch.cat([mask.repeat_interleave(n_lab, 0), lab_m], dim=1)
        lab_pos = pos[:, -1:].repeat_interleave(n_lab, 0) + 1 + torch.arange(width, device=device)
        rest = model(input_ids=lab_ids, attention_mask=full_mask, position_ids=lab_pos,
                     past_key_values=cache, use_cache=True).logits                # (B*L, W, V)
        # token t of a label is predicted by position t-1 of `rest`, token 0 by the prompt's last
        logp0 = last.repeat_interleave(n_lab, 0).gather(1, lab_ids[:, :1]).squeeze(1)
        if width > 1:
            steps = torch.log_softmax(rest[:, :-1].float(), dim=-1).gather(2, lab_ids[:, 1:, None]).squeeze(2)
            total = logp0 + (steps * lab_m[:, 1:]).sum(1)
        else:
            total = logp0
    return total.view(b, n_lab).cpu().double().numpy()
