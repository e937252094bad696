"""Batched greedy generation with left padding; a batch out of memory is split, a row that never fits is reported.

Greedy decoding only (determinism). Generation of a batch stops as soon as every row has ended.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tqdm import tqdm

from tickettune.pipeline.modeling import halving_on_oom

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    text: str | None        # None: generation failed for this row (caller substitutes a safe reply)
    prompt_tokens: int
    new_tokens: int
    finished: bool          # ended with an end-of-turn token (not cut by max_new_tokens)
    seconds: float          # this row's share of its batch's wall-clock


def generate(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int, batch_size: int,
             stop_ids: list[int], *, deadline: float | None = None, batch_s: float = 0.0) -> list[Generated]:
    """Greedy continuations of `prompts_ids`, in input order. A batch that would end after `deadline`
    (monotonic s; judged by the slowest batch so far, or `batch_s` before the first) is not
    started: its rows and the rest get `text=None`, for the caller's retrieved reply."""
    results: list[Generated | None] = [None] * len(prompts_ids)
    bar = tqdm(total=len(prompts_ids), desc="reply", unit="ticket", leave=False, disable=None)
    slowest = batch_s
    for start, stop in balanced_batches(len(prompts_ids), batch_size):
        rows = list(range(start, stop))
        if deadline is not None and time.monotonic() + slowest > deadline:
            log.warning("time budget reached: %d rows get the retrieved reply", len(prompts_ids) - start)
            for i in range(start, len(prompts_ids)):
                results[i] = Generated(None, len(prompts_ids[i]), 0, False, 0.0)
            break
        t0 = time.monotonic()
        for i, g in zip(rows, _generate_or_split(model, tokenizer, [prompts_ids[i] for i in rows],
                                                max_new_tokens, stop_ids)):
            results[i] = g
        slowest = max(slowest, time.monotonic() - t0)
        bar.update(len(rows))
    bar.close()
    return results  # type: ignore[return-value]


def balanced_batches(n: int, max_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest batches of at most `max_size` rows, sizes differing by <= 1:
    50 rows at 16 -> 12, 13, 13, 12 (not 16, 16, 16, 2: a batch costs its longest reply's steps).

    >>> balanced_batches(50, 16)
    [(0, 12), (12, 25), (25, 38), (38, 50)]
    """
    if n == 0:
        return []
    count = -(-n // max_size)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count)]


def _generate_or_split(model, tokenizer, batch: list[list[int]], max_new_tokens: int,
                       stop_ids: list[int]) -> list[Generated]:
    """`_generate_batch`, halving the batch when it runs out of memory; a single row that still does
    not fit is reported (text None: the caller gives it the safe reply). Any other error is a real
    fault and propagates."""
    return halving_on_oom(lambda part: _generate_batch(model, tokenizer, part, max_new_tokens, stop_ids), batch,
                          lambda row: Generated(None, len(row), 0, False, 0.0), "generation")


def _generate_batch(model, tokenizer, batch: list[list[int]], max_new_tokens: int,
                    stop_ids: list[int]) -> list[Generated]:
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in batch)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    # greedy; the model's own repetition penalty (Qwen2.5-Instruct: 1.05) is kept, sampling knobs are off
    penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None) or 1.0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None,
                              top_p=None, top_k=None, repetition_penalty=penalty,
                              eos_token_id=stop_ids, pad_token_id=pad)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    seconds = (time.perf_counter() - t0) / len(batch)
    results = []
    stops = set(stop_ids)
    for i, p in enumerate(batch):
        new = out[i, width:].tolist()
        n = next((k for k, t in enumerate(new) if t in stops), None)
        finished = n is not None
        new = new[:n] if finished else [t for t in new if t != pad]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        results.append(Generated(text, len(p), len(new) + (1 if finished else 0), finished, seconds))
    return results
