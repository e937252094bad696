"""Log-likelihood of continuations after prompts, batched with one KV cache per prompt.

The prompts of a batch run once (left padded, so that they all end at the same column); their
KV cache is repeated once per continuation, and only the continuation tokens run again. A
continuation's score is the *sum* of its tokens' log-probabilities (a likelihood; normalise it
yourself if you need to). Used for intent labels (`intent.score_labels`: every ticket against the
same labels, or its own candidates) and for multiple-choice questions (`tickettune forgetting`).

Failures are contained: a batch that runs out of GPU memory is retried in halves, and a single
prompt that still does not fit gets zeros (no preference) with a warning; a batch whose scores
come back NaN (some GPU attention kernels on left-padded rows) is rescored one prompt at a time.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from tickettune.pipeline.modeling import halving_on_oom

log = logging.getLogger(__name__)


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[list[int]]], pad_id: int,
                          batch_size: int, desc: str = "scoring") -> list[np.ndarray]:
    """For prompt i, the summed log P(c | prompt i) of each of its continuations `continuations[i]`
    (token ids; each non-empty). Returns one float64 array per prompt, in input order."""
    out: list[np.ndarray] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False, disable=None)
    for start in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts[start:start + batch_size], continuations[start:start + batch_size]))
        scores = _score_or_split(model, chunk, pad_id, desc)
        if not all(np.isfinite(s).all() for s in scores):
            scores = [s for pair in chunk for s in _score_or_split(model, [pair], pad_id, desc)]
        out += scores
        bar.update(len(chunk))
    bar.close()
    return out


def _score_or_split(model, chunk: list[tuple[list[int], list[list[int]]]], pad_id: int, desc: str) -> list[np.ndarray]:
    """`_score_chunk`, halving the batch when it runs out of memory; a single prompt that still does
    not fit gets zeros for every continuation (equal scores)."""
    return halving_on_oom(lambda part: _score_chunk(model, part, pad_id), chunk, lambda pair: np.zeros(len(pair[1])),
                          desc)


def _score_chunk(model, chunk: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[np.ndarray]:
    import torch

    device = next(model.parameters()).device
    b = len(chunk)
    k = max(len(conts) for _, conts in chunk)                      # continuations per prompt, padded
    width = max(len(c) for _, conts in chunk for c in conts)
    plen = max(len(p) for p, _ in chunk)
    ids = torch.full((b, plen), pad_id, dtype=torch.long)
    mask = torch.zeros((b, plen), dtype=torch.long)
    cont = torch.full((b * k, width), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((b * k, width), dtype=torch.long)
    for i, (p, conts) in enumerate(chunk):  # left padding: every prompt ends at the same column
        ids[i, plen - len(p):] = torch.tensor(p)
        mask[i, plen - len(p):] = 1
        for j, c in enumerate(conts):
            cont[i * k + j, :len(c)] = torch.tensor(c)
            cont_mask[i * k + j, :len(c)] = 1
        for j in range(len(conts), k):  # filler rows: scored, then dropped
            cont_mask[i * k + j, 0] = 1
    ids, mask, cont, cont_mask = ids.to(device), mask.to(device), cont.to(device), cont_mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        cache.batch_repeat_interleave(k)                                     # (B*K, ...)
        last = torch.log_softmax(first.logits[:, -1].float(), dim=-1)        # (B, V)
        full_mask = torch.cat([mask.repeat_interleave(k, 0), cont_mask], dim=1)
        cont_pos = pos[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(width, device=device)
        rest = model(input_ids=cont, attention_mask=full_mask, position_ids=cont_pos,
                     past_key_values=cache, use_cache=True).logits               # (B*K, W, V)
        # token t of a continuation is predicted by position t-1 of `rest`, token 0 by the prompt's last
        logp0 = last.repeat_interleave(k, 0).gather(1, cont[:, :1]).squeeze(1)
        if width > 1:
            steps = torch.log_softmax(rest[:, :-1].float(), dim=-1).gather(2, cont[:, 1:, None]).squeeze(2)
            total = logp0 + (steps * cont_mask[:, 1:]).sum(1)
        else:
            total = logp0
    scores = total.view(b, k).cpu().double().numpy()
    return [scores[i, :len(conts)] for i, (_, conts) in enumerate(chunk)]
