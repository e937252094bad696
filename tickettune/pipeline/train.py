"""LoRA training: build the two tasks' sequences, run the loop, measure an honest val_loss.

Two LoRA adapters on one base model (see `modeling.add_lora`): the intent adapter learns
ticket -> intent label, with noisy copies of each ticket, for `epochs` epochs; the reply adapter
learns ticket + retrieved reference replies -> the ideal reply for `reply_epochs` epochs (its
sequences are ~5x longer: this is where CPU time goes). Loss is on the assistant turn only.

val_loss: a stratified slice of train (`holdout_frac`, only from intents that keep >= 1 row) is
held out, and neither adapter ever trains on it: each adapter's loss there is measured at the end,
and val_loss is the token-weighted mean of the two. The same rows decide whether the LM enters the
intent ensemble (`calibration.calibrate`) and whether replies are generated (`reply_policy`);
the retrieval index, the prototypes and the encoder's final head still use every row, so the
taxonomy loses nothing. When nothing can be held out (one row per intent, < 5 rows) val_loss is the
progressive loss of epoch 1: each batch's loss taken before the optimiser step that uses it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass

from tqdm import tqdm

from tickettune.pipeline import prompts
from tickettune.pipeline.augment import noisy_copies
from tickettune.pipeline.config import TrainConfig
from tickettune.pipeline.data import Example
from tickettune.pipeline.modeling import free_memory, out_of_memory_error

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class Sequence:
    input_ids: list[int]
    labels: list[int]      # IGNORE on prompt tokens
    row: int               # index of the train example it came from
    task: str = "intent"   # "intent" | "reply"


@dataclass
class TrainResult:
    steps: int
    tokens: int            # non-padding tokens through forward+backward (for throughput / MFU)
    train_loss: float
    val_loss: float
    history: list[dict]
    stopped_early: bool
    train_tokens: int = 0  # scored tokens behind train_loss / val_loss, to combine adapters
    val_tokens: int = 0


def build_sequences(examples: list[Example], tokenizer, cfg: TrainConfig, *, references: list[list[str]],
                    labels_in_prompt: list[str] | None, max_ticket_tokens: int, seed: int) -> list[Sequence]:
    """All training sequences: per row, the intent task (+ noisy copies) and the reply task (from
    `references[row]`); `labels_in_prompt`: the label list the intent prompt shows (None: none)."""
    rng = random.Random(seed)
    seqs = []
    for row, ex in enumerate(examples):
        ticket, _ = prompts.truncate_ticket(tokenizer, ex.ticket, max_ticket_tokens)
        for text in [ticket] + noisy_copies(ticket, cfg.augment_copies, rng):
            seqs.append(_sequence(tokenizer, prompts.intent_messages(text, labels_in_prompt), ex.intent, row, cfg))
        if cfg.reply_epochs:
            msgs = prompts.reply_messages(ticket, references[row])
            seqs.append(_sequence(tokenizer, msgs, ex.ideal_reply.strip(), row, cfg, "reply"))
    return seqs


def _sequence(tokenizer, messages, completion: str, row: int, cfg: TrainConfig, task: str = "intent") -> Sequence:
    prompt_ids, completion_ids = prompts.render(tokenizer, messages, completion)
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    if len(ids) > cfg.max_seq_len:  # keep the answer; drop the start of an over-long prompt
        ids, labels = ids[-cfg.max_seq_len:], labels[-cfg.max_seq_len:]
    return Sequence(ids, labels, row, task)


def holdout_rows(examples: list[Example], frac: float, seed: int, most: int = 0) -> set[int]:
    """Stratified rows no adapter trains on: at most one per intent that has >= 2 rows (never an
    intent's last row), `frac` of the rows and at most `most` of them (0: no cap). Empty when < 5 rows."""
    if frac <= 0 or len(examples) < 5:
        return set()
    rng = random.Random(seed)
    by_intent: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_intent.setdefault(ex.intent, []).append(i)
    candidates = []  # at most one row per intent that has >= 2 rows
    for intent in sorted(by_intent):
        rows = by_intent[intent]
        if len(rows) >= 2:
            candidates.append(rng.choice(rows))
    rng.shuffle(candidates)
    n = min(len(candidates), max(1, round(frac * len(examples))), most or len(candidates))
    return set(candidates[:n])


def batches(seqs: list[Sequence], batch_size: int, rng: random.Random, max_tokens: int = 0) -> list[list[Sequence]]:
    """Shuffle, sort within windows of 4 batches by length (little padding), then cut batches of at
    most `batch_size` rows and, when `max_tokens`, at most that many padded tokens: short intent
    rows travel in full batches while long reply rows do not blow up activation memory."""
    order = list(seqs)
    rng.shuffle(order)
    window = batch_size * 4
    out: list[list[Sequence]] = []
    for start in range(0, len(order), window):
        batch: list[Sequence] = []
        for seq in sorted(order[start:start + window], key=lambda s: len(s.input_ids)):
            width = max([len(seq.input_ids)] + [len(s.input_ids) for s in batch])
            if batch and (len(batch) == batch_size or (max_tokens and width * (len(batch) + 1) > max_tokens)):
                out.append(batch)
                batch = []
            batch.append(seq)
        if batch:
            out.append(batch)
    rng.shuffle(out)
    return out


def collate(batch: list[Sequence], pad_id: int, device):
    """Right-padded tensors (B, T): input_ids, attention_mask, labels."""
    import torch

    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def _loss(model, batch: list[Sequence], pad_id: int, device) -> tuple[object, int]:
    """Mean token loss of the batch (a tensor) and the number of scored tokens.

    The LM head runs only on positions that predict an assistant token: most positions are
    prompt, and full (B, T, vocab) logits were the largest tensor of a step (SmolLM2's head is
    a fifth of its parameters)."""
    import torch

    ids, mask, labels = collate(batch, pad_id, device)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state   # (B, T, H)
    target = labels[:, 1:]                                                              # (B, T-1)
    scored = target != IGNORE
    logits = causal.get_output_embeddings()(hidden[:, :-1][scored])                     # (n, V)
    loss = torch.nn.functional.cross_entropy(logits.float(), target[scored])
    return loss, int(scored.sum())


def combine(parts: list[TrainResult]) -> TrainResult:
    """One result for several adapters: steps and tokens add up, losses are token-weighted means."""
    return TrainResult(
        steps=sum(p.steps for p in parts), tokens=sum(p.tokens for p in parts),
        train_loss=_weighted([(p.train_loss, p.train_tokens) for p in parts]),
        val_loss=_weighted([(p.val_loss, p.val_tokens) for p in parts]),
        history=[h for p in parts for h in p.history], stopped_early=any(p.stopped_early for p in parts),
        train_tokens=sum(p.train_tokens for p in parts), val_tokens=sum(p.val_tokens for p in parts))


def _weighted(pairs: list[tuple[float, int]]) -> float:
    pairs = [(v, n) for v, n in pairs if n and math.isfinite(v)]
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else float("nan")


def train(model, tokenizer, seqs: list[Sequence], held: set[int], *, cfg: TrainConfig, epochs: int, seed: int,
          deadline: float | None = None, autocast=contextlib.nullcontext, task: str = "intent") -> TrainResult:
    """Run the LoRA loop over `seqs` on the active adapter, never on the rows in `held` (their loss,
    measured at the end, is the val_loss). Stops at `deadline` (monotonic s).

    `autocast()` wraps the forward passes only: with the optimiser step inside a CPU bf16 autocast
    region the adapter did not learn at all (loss flat at ~7), while forward-only autocast matches
    fp32's loss curve at 1.8x the speed.
    """
    rng = random.Random(seed)
    trained = [s for s in seqs if s.row not in held]
    held_seqs = [s for s in seqs if s.row in held]
    # batches are drawn per epoch (seeded), so the step count is known before training starts
    plan = [batches(trained, cfg.batch_size, rng, cfg.max_batch_tokens) for _ in range(epochs)]
    total = sum(len(p) for p in plan)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    loop = _Loop.start(model, tokenizer.pad_token_id, autocast, cfg, total)
    history: list[dict] = []
    stopped = False
    val_loss, val_tokens = float("nan"), 0
    progressive = [0.0, 0]  # loss·tokens and tokens of epoch 1, before each update
    epoch_loss = [0.0, 0]
    model.train()
    bar = tqdm(total=total, desc=f"train {task}", unit="step", leave=False, disable=None)
    for epoch in range(epochs):
        epoch_loss = [0.0, 0]
        for batch in plan[epoch]:
            if loop.step >= total or (deadline is not None and time.monotonic() > deadline):
                stopped = loop.step < total
                break
            value, n_tok = loop.update(batch, task)
            for tally in ([epoch_loss, progressive] if epoch == 0 else [epoch_loss]) if n_tok else []:
                tally[0] += value * n_tok
                tally[1] += n_tok
            history.append({"step": loop.step, "epoch": epoch + 1, "task": task,
                            "loss": round(value, 5) if math.isfinite(value) else None})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        last = epoch == epochs - 1 or loop.step >= total or stopped
        if held_seqs and loop.step and last:  # an untrained adapter: no val_loss
            with autocast():
                val_loss, val_tokens = evaluate_loss(model, tokenizer, held_seqs, cfg.batch_size)
            history.append({"step": loop.step, "epoch": epoch + 1, "task": task,
                            "val_loss": round(val_loss, 5) if math.isfinite(val_loss) else None})
            model.train()
        if last:
            break
    bar.close()
    model.eval()
    if not held_seqs:
        val_loss, val_tokens = (progressive[0] / progressive[1], progressive[1]) if progressive[1] else (float("nan"), 0)
    train_loss = epoch_loss[0] / epoch_loss[1] if epoch_loss[1] else float("nan")
    if stopped:
        log.warning("%s training stopped early at step %d/%d to fit the time budget", task, loop.step, total)
    return TrainResult(loop.step, loop.tokens, train_loss, val_loss, history, stopped, epoch_loss[1], val_tokens)


@dataclass
class _Loop:
    """One adapter's optimiser, schedule and step count, and the micro-batch split it trains with."""
    model: object
    pad_id: int
    device: object
    autocast: object
    params: list
    opt: object
    sched: object
    step: int = 0
    tokens: int = 0   # non-padding tokens through forward+backward
    chunks: int = 1   # micro-batches per batch: doubled (for the rest of training) when a batch runs out of memory

    @classmethod
    def start(cls, model, pad_id: int, autocast, cfg: TrainConfig, total: int) -> "_Loop":
        """AdamW over the trainable (LoRA) parameters, linear warmup then linear decay to 0 at `total`."""
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, int(cfg.warmup_frac * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
        return cls(model, pad_id, next(model.parameters()).device, autocast, params, opt, sched)

    def update(self, batch: list[Sequence], task: str) -> tuple[float, int]:
        """One optimiser step on `batch`: (its mean token loss, its scored tokens)."""
        import torch

        value, n_tok, self.chunks = _gradients(self.model, batch, self.pad_id, self.device, self.autocast,
                                               chunks=self.chunks, opt=self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if n_tok and torch.isfinite(norm):
            self.opt.step()
        elif n_tok:  # one bad batch must not write NaN into the whole adapter
            log.warning("%s step %d: non-finite gradient norm, update skipped", task, self.step + 1)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.tokens += sum(len(s.input_ids) for s in batch)
        self.step += 1
        return value, n_tok


def _gradients(model, batch: list[Sequence], pad_id: int, device, autocast, *, chunks: int, opt):
    """Forward and backward of `batch`, leaving its gradient in the parameters; returns (mean token
    loss, scored tokens, micro-batches used). When the batch runs out of GPU memory the step is
    redone in twice as many micro-batches (gradients accumulated, token-weighted: the same
    gradient up to rounding), and that split is kept for the following batches. When even one
    row at a time runs out, the rows that fit make the step (see `_row_by_row`)."""
    oom = out_of_memory_error()
    while True:
        try:
            value, n_tok = _accumulate(model, batch, pad_id, device, autocast, min(chunks, len(batch)))
            return value, n_tok, chunks
        except oom:
            pass  # handled below, outside the handler, so that the traceback's tensors can be freed
        opt.zero_grad(set_to_none=True)
        free_memory()
        if chunks >= len(batch):
            value, n_tok = _row_by_row(model, batch, pad_id, device, autocast, oom)
            return value, n_tok, chunks
        chunks *= 2
        log.warning("a batch of %d rows ran out of memory: training in %d micro-batches from now on",
                    len(batch), min(chunks, len(batch)))


def _row_by_row(model, batch: list[Sequence], pad_id: int, device, autocast, oom) -> tuple[float, int]:
    """Backward one row at a time; a row that runs out of memory is skipped with a warning (the
    gradient is restored to what it was before that row), and the kept rows' gradient is their
    own token mean. Returns (mean token loss, scored tokens kept)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(_scored(s) for s in batch)
    kept, weighted = 0, 0.0
    for seq in batch:
        if not _scored(seq):
            continue
        before = [None if p.grad is None else p.grad.clone() for p in params]  # LoRA only: small
        try:
            with autocast():
                loss, n_tok = _loss(model, [seq], pad_id, device)
            (loss * (n_tok / total)).backward()
            weighted, kept = weighted + float(loss.detach()) * n_tok, kept + n_tok
            continue
        except oom:
            pass
        for param, grad in zip(params, before):  # drop whatever the failed backward accumulated
            param.grad = grad
        free_memory()
        log.warning("a training row of %d tokens does not fit in memory: skipped", len(seq.input_ids))
    if kept and kept < total:
        for param in params:
            if param.grad is not None:
                param.grad.mul_(total / kept)
    return (weighted / kept if kept else float("nan")), kept


def _accumulate(model, batch: list[Sequence], pad_id: int, device, autocast, chunks: int) -> tuple[float, int]:
    """Backward of the token-mean loss of `batch`, computed in `chunks` micro-batches."""
    if chunks <= 1:
        with autocast():
            loss, n_tok = _loss(model, batch, pad_id, device)
        loss.backward()
        return float(loss.detach()), n_tok
    size = -(-len(batch) // chunks)
    parts = [batch[i:i + size] for i in range(0, len(batch), size)]
    total = sum(_scored(s) for s in batch)
    weighted = 0.0
    for part in parts:
        if not any(_scored(s) for s in part):
            continue
        with autocast():
            loss, n_tok = _loss(model, part, pad_id, device)
        (loss * (n_tok / total)).backward()
        weighted += float(loss.detach()) * n_tok
    return (weighted / total if total else float("nan")), total


def _scored(seq: Sequence) -> int:
    """Tokens of `seq` that the loss scores (as `_loss` counts them: labels shifted by one)."""
    return sum(1 for label in seq.labels[1:] if label != IGNORE)


def time_step(model, tokenizer, batch: list[Sequence], autocast=contextlib.nullcontext) -> float:
    """Seconds of one training step's forward and backward pass over `batch` (what a step costs,
    the optimiser's small LoRA update aside); the gradients are thrown away, nothing is learnt."""
    device = next(model.parameters()).device
    model.train()
    seconds = []
    for _ in range(2):  # the first pass also pays one-time costs (kernel selection, allocations)
        t0 = time.perf_counter()
        _accumulate(model, batch, tokenizer.pad_token_id, device, autocast, 1)
        seconds.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    model.eval()
    return min(seconds)


def evaluate_loss(model, tokenizer, seqs: list[Sequence], batch_size: int) -> tuple[float, int]:
    """Token-weighted mean loss of `seqs` without updating anything, and the scored token count.
    A batch that runs out of GPU memory is measured row by row; a row that still does not fit is
    left out of the mean (with a warning)."""
    import torch

    oom = out_of_memory_error()
    device = next(model.parameters()).device
    model.eval()
    total, tokens = 0.0, 0
    ordered = sorted(seqs, key=lambda s: len(s.input_ids))
    pending = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    while pending:
        batch = pending.pop(0)
        try:
            with torch.no_grad():
                loss, n_tok = _loss(model, batch, tokenizer.pad_token_id, device)
            total += float(loss) * n_tok
            tokens += n_tok
            continue
        except oom:
            pass  # handled outside the handler, so that the traceback's tensors can be freed
        free_memory()
        if len(batch) > 1:
            pending = [[s] for s in batch] + pending
        else:
            log.warning("val_loss: a row of %d tokens does not fit in memory: left out", len(batch[0].input_ids))
    return (total / tokens if tokens else float("nan")), tokens
