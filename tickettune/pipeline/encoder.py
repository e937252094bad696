"""The intent encoder: the chosen sentence encoder (all-mpnet-base-v2 where it is set up, else all-MiniLM-L6-v2:
`EncoderConfig.model`, `embeddings`) fine-tuned on this desk's tickets, with a logistic-regression
head on its embeddings: the intent ensemble's strongest expert.

Fine-tuning (`IntentEncoder.fit`) follows the few-shot recipe of SetFit-style contrastive tuning:
LoRA on every linear layer of the encoder's blocks (the embedding table stays frozen), a
supervised contrastive loss (Khosla et al. 2020) on L2-normalised mean-pooled embeddings in
class-balanced batches (`per_class` rows of `batch_size / per_class` intents), bf16 autocast on the
CPU. Training texts: each train ticket, `copies` noisy copies of it (`augment`), and each intent's
name as words ("billing.seat_question" -> "billing seat question"): the label says what the intent is
about, which helps most when an intent has few rows. The head is fitted on the same texts.
Steps: `epochs` passes over the texts, at least `min_steps`, at most `max_steps` (bounded cost at
any size). The recipe and its numbers were chosen by cross-validation inside Banking77's few-shot
rows (bench/fewshot_intent.py, README), not on the Northstar samples. Under a deadline that cuts the
planned steps short (many rows, a short budget) the learning-rate decay is fitted to the time left
(`DeadlineSchedule`): on a Banking77 dev split at 10 shots and 165 s, 0.845 -> 0.851 for the
encoder alone (seeds 0-2; the test set untouched).

Only the LoRA weights (a few MB) and the head are saved (`ENCODER_DIR` in the weights folder); the
base encoder comes from the bundled package (or the mpnet cache folder) again at load. Deterministic
given the seed.
Does not embed for retrieval: replies are retrieved with the frozen encoder (`embeddings`), whose
neighbourhoods fine-tuning for intents would blur.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tickettune.pipeline.augment import noisy_copies
from tickettune.pipeline.config import AUTO_ENCODER, EncoderConfig
from tickettune.pipeline.retrieval import fit_linear_head, label_words, log_softmax

log = logging.getLogger(__name__)
ENCODER_DIR = "encoder"          # in the weights folder: the LoRA adapter and head.safetensors
HEAD_FILE = "head.safetensors"
LORA_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"      # BERT (MiniLM): attention.self.query ...
MPNET_LORA_TARGETS = r".*encoder\.layer\.\d+\..*\.(q|k|v|o|dense)$"      # MPNet: attention.attn.q, .k, .v, .o


def lora_targets(model) -> str:
    """Every linear layer of the encoder's blocks, by architecture (MPNet names its projections q/k/v/o)."""
    return MPNET_LORA_TARGETS if getattr(model.config, "model_type", "") == "mpnet" else LORA_TARGETS


def training_texts(tickets: list[str], intents: list[str], labels: list[str], cfg: EncoderConfig,
                   seed: int) -> tuple[list[str], np.ndarray]:
    """The texts the encoder and its head learn from, with their label indices: every ticket, its
    noisy copies, and (`cfg.label_names`) each intent's name as words.

    >>> texts, y = training_texts(["Add a seat"], ["billing.seats"], ["billing.seats"],
    ...                           EncoderConfig(copies=0), 0)
    >>> texts, y.tolist()
    (['Add a seat', 'billing seats'], [0, 0])
    """
    rng = random.Random(seed)
    texts, y = [], []
    for ticket, intent in zip(tickets, intents):
        for text in [ticket] + noisy_copies(ticket, cfg.copies, rng):
            texts.append(text)
            y.append(labels.index(intent))
    if cfg.label_names:
        texts += [label_words(lab) for lab in labels]
        y += list(range(len(labels)))
    return texts, np.array(y, dtype=np.int64)


def class_balanced_batches(y: np.ndarray, steps: int, batch_size: int, per_class: int,
                           rng: random.Random) -> list[list[int]]:
    """`steps` batches of `per_class` rows from each of `batch_size // per_class` intents, intents and
    their rows drawn without replacement until used up (then reshuffled): every batch has positives.

    >>> [sorted(b) for b in class_balanced_batches(np.array([0, 0, 1, 1]), 2, 4, 2, random.Random(0))]
    [[0, 1, 2, 3], [0, 1, 2, 3]]
    """
    rows_of: dict[int, list[int]] = {}
    for i, c in enumerate(y.tolist()):
        rows_of.setdefault(c, []).append(i)
    classes = sorted(rows_of)
    n_classes = max(1, min(len(classes), batch_size // per_class))
    queues: dict[int, list[int]] = {c: [] for c in classes}
    pool: list[int] = []
    out = []
    for _ in range(steps):
        while len(pool) < n_classes:
            more = classes[:]
            rng.shuffle(more)
            pool += [c for c in more if c not in pool[:n_classes]]
        pick, pool = pool[:n_classes], pool[n_classes:]
        batch = []
        for c in pick:
            for _ in range(per_class):
                if not queues[c]:
                    queues[c] = rng.sample(rows_of[c], len(rows_of[c]))
                batch.append(queues[c].pop())
        out.append(batch)
    return out


class DeadlineSchedule:
    """The learning-rate factor per step: linear warm-up over the first tenth of the planned steps,
    then linear decay to 0 at `horizon`. Without a deadline `horizon` is the planned step count; under
    one, `refit` brings it forward to the step the time left allows (at the mean pace so far), so
    training that must stop early still ends with the rate decayed instead of cut off at its peak.

    >>> s = DeadlineSchedule(500)
    >>> s.refit(done=100, elapsed_s=50.0, left_s=100.0); s.horizon, s(299) > 0, s(300)
    (300, True, 0.0)
    >>> s.refit(done=100, elapsed_s=50.0, left_s=1e6); s.horizon    # never past the plan
    500
    """

    def __init__(self, planned: int):
        self.planned = self.horizon = planned
        self.warmup = max(1, planned // 10)

    def __call__(self, step: int) -> float:
        return min((step + 1) / self.warmup, max(0.0, (self.horizon - step) / max(1, self.horizon - self.warmup)))

    def refit(self, done: int, elapsed_s: float, left_s: float) -> None:
        if done > 0 and elapsed_s > 0:
            self.horizon = max(done + 1, min(self.planned, done + int(max(0.0, left_s) * done / elapsed_s)))


def supcon_loss(embeddings, y, temperature: float):
    """Supervised contrastive loss on L2-normalised embeddings (B, D) with labels (B,)."""
    import torch

    sim = embeddings @ embeddings.t() / temperature                        # (B, B)
    eye = torch.eye(len(y), dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, -1e9)
    positives = (y[:, None] == y[None, :]) & ~eye
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    count = positives.sum(1)
    keep = count > 0
    if not keep.any():
        return embeddings.sum() * 0.0
    return -((logp * positives).sum(1)[keep] / count[keep]).mean()


@dataclass
class IntentEncoder:
    labels: list[str]
    model: object            # the encoder's transformer (a PeftModel once fine-tuned)
    tokenizer: object
    coef: np.ndarray         # (C, D) logistic-regression head
    intercept: np.ndarray    # (C,)
    max_length: int = 128
    steps: int = 0           # fine-tuning steps taken (0 when loaded)
    choice: str | None = None  # the sentence encoder it is built on ("minilm" | "mpnet"; None: the process's)
    adapter: str | None = None  # its adapter's name on a base shared with other desks (`bases`); None: its own

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised mean-pooled embeddings (N, D), fp32, in input order."""
        import torch
        import torch.nn.functional as F

        if self.adapter is not None:  # a shared base: this desk's adapter, whichever desk ran last
            self.model.set_adapter(self.adapter)
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] or " " for i in rows], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state.float()          # (B, T, D)
                out[rows] = F.normalize(_mean_pool(hidden, enc["attention_mask"]), dim=-1).numpy()
        return out

    def logprobs(self, texts: list[str]) -> np.ndarray:
        """log P(intent | ticket) under the head. (N,) texts -> (N, C)."""
        return log_softmax(self.embed(texts).astype(np.float64) @ self.coef.T + self.intercept)

    def refit_head(self, texts: list[str], y: np.ndarray, cfg: EncoderConfig) -> None:
        """Fit the logistic-regression head on `texts` (the encoder unchanged)."""
        self.coef, self.intercept = fit_linear_head(self.embed(texts), y, len(self.labels), cfg.head_C)

    @classmethod
    def fit(cls, texts: list[str], y: np.ndarray, labels: list[str], cfg: EncoderConfig, *, seed: int,
            deadline: float | None = None, choice: str | None = None) -> "IntentEncoder":
        """Fine-tune the sentence encoder on (`texts`, `y`) as the module says and fit the head.
        Stops early at `deadline` (monotonic s). `choice`: the encoder, by default the process's
        (`embeddings.selected_encoder`, which run.py sets from `cfg.model`): the one the index embeds with."""
        import torch

        from tickettune.pipeline.embeddings import ENV_EMBEDDER, selected_encoder

        choice = choice or selected_encoder()
        if choice != cfg.model and cfg.model != AUTO_ENCODER and not os.environ.get(ENV_EMBEDDER):
            log.warning("intent encoder: built on %s (the process's encoder) while the config says %s: "
                        "run.py selects the config's (embeddings.select_encoder)", choice, cfg.model)
        model, tokenizer = _lora_encoder(choice, cfg, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
        planned = max(cfg.min_steps, min(cfg.max_steps, math.ceil(cfg.epochs * len(texts) / cfg.batch_size)))
        schedule = DeadlineSchedule(planned)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        ids = tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]
        labels_t = torch.tensor(y)
        model.train()
        t0, done, losses = time.perf_counter(), 0, []
        for batch in class_balanced_batches(y, planned, cfg.batch_size, cfg.per_class, random.Random(seed)):
            if deadline is not None and cfg.fit_schedule and done >= schedule.warmup and done % 10 == 0:
                schedule.refit(done, time.perf_counter() - t0, deadline - time.monotonic())
            if done >= schedule.horizon or (deadline is not None and time.monotonic() > deadline):
                break
            losses.append(_supcon_step(model, [ids[i] for i in batch], labels_t[batch], cfg, opt))
            sched.step()
            done += 1
        if done < planned:
            log.warning("intent encoder: stopped at step %d/%d to fit the time budget", done, planned)
        log.info("intent encoder: %d steps on %d texts in %.1f s, loss %.3f -> %.3f", done, len(texts),
                 time.perf_counter() - t0, losses[0] if losses else float("nan"),
                 float(np.mean(losses[-max(1, done // 10):])) if losses else float("nan"))
        encoder = cls(list(labels), model.eval(), tokenizer, np.zeros((0, 0)), np.zeros(0), cfg.max_length, done,
                      choice)
        encoder.refit_head(texts, y, cfg)
        return encoder

    def save(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        from tickettune.pipeline.embeddings import encoder_name

        folder = Path(folder) / ENCODER_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = encoder_name(self.choice)  # portable: the package pin, not this machine's site-packages path
        for config in self.model.peft_config.values():
            config.base_model_name_or_path = name
        base = self.model.get_base_model()
        base.config.name_or_path = base.name_or_path = name
        self.model.save_pretrained(folder, safe_serialization=True)
        save_file({"coef": np.ascontiguousarray(self.coef), "intercept": np.ascontiguousarray(self.intercept)},
                  str(folder / HEAD_FILE))

    @classmethod
    def load(cls, folder: str | Path, labels: list[str], max_length: int, choice: str | None = None, *,
             shared=None, key: str = "") -> "IntentEncoder":
        """The encoder `save` wrote into `folder`, on the base `choice` names (default: the process's);
        with `shared` (a `bases.SharedBases`), its adapter loads onto that process-wide base as `key`'s."""
        from peft import PeftModel
        from safetensors.numpy import load_file

        from tickettune.pipeline.embeddings import selected_encoder

        folder = Path(folder) / ENCODER_DIR
        adapter = None
        if shared is not None:
            model, tokenizer, adapter = shared.encoder(choice or selected_encoder(), folder, key)
        else:
            base, tokenizer = load_base_encoder(choice)
            model = PeftModel.from_pretrained(base, str(folder)).eval()
        head = load_file(str(folder / HEAD_FILE))
        return cls(list(labels), model, tokenizer, head["coef"], head["intercept"], max_length, choice=choice,
                   adapter=adapter)


def _lora_encoder(choice: str, cfg: EncoderConfig, seed: int):
    """(PeftModel, tokenizer): the base sentence encoder `choice` with fresh LoRA weights (seeded; the
    embedding layer frozen)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base_encoder(choice)
    torch.manual_seed(seed)
    for p in model.embeddings.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                                             target_modules=lora_targets(model), bias="none"))
    return model, tokenizer


def _supcon_step(model, rows: list[list[int]], labels, cfg: EncoderConfig, opt) -> float:
    """One optimiser step of the supervised contrastive loss over the token-id `rows` (right-padded
    into one batch) and their `labels` (a tensor); returns the loss."""
    import torch
    import torch.nn.functional as F

    width = max(len(r) for r in rows)
    inp = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        inp[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        hidden = model(input_ids=inp, attention_mask=mask).last_hidden_state
    emb = F.normalize(_mean_pool(hidden.float(), mask), dim=-1)
    loss = supcon_loss(emb, labels, cfg.temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def load_base_encoder(choice: str | None = None):
    """(transformer, tokenizer) of the chosen sentence encoder (default: the process's; the bundled
    all-MiniLM-L6-v2 or the verified all-mpnet-base-v2 folder), or of $TICKETTUNE_EMBEDDER."""
    from transformers import AutoModel, AutoTokenizer

    from tickettune.pipeline.embeddings import encoder_source

    source, local = encoder_source(choice)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    model = AutoModel.from_pretrained(source, local_files_only=local, add_pooling_layer=False)
    return model.eval(), tokenizer
