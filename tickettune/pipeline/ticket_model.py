"""The trained model of one support desk: it predicts tickets, saves itself into a folder, and
loads back from that folder alone (no training file), on CPU or GPU.

A `TicketModel` owns everything prediction needs: the hardware plan (which names the base model),
the run config, the PeftModel with both adapters (intent at the root of the folder, reply in
`reply/`), the tokenizer, the fine-tuned intent encoder (`encoder/`: its LoRA weights and head),
the retrieval index (train tickets, intents, replies and their embeddings), the calibrated
ensemble weights, the reply policy and the name of the sentence encoder.

    >>> model = TicketModel.load("runs/weights")                    # doctest: +SKIP
    >>> predictions, diagnostics = model.predict([Ticket("t1", "How do I add a seat?")])  # doctest: +SKIP

`predict` is repeatable: it switches adapters and merges the reply adapter only for the duration
of a call, restoring the weights exactly (`modeling.merged`), so a second call answers the same.
The folder is portable: it names the base model by its plan id (`bundled:smollm2-135m`, a hub id),
never by a path of the machine that trained it (the folder's files and checks: `weights_folder`).
`retrieval_only` is the safety net for when no model can be had at all. Exactly one `Prediction` per input row, in input order, whatever fails.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tickettune import __version__
from tickettune.pipeline import modeling, prompts
from tickettune.pipeline.config import RunConfig
from tickettune.pipeline.data import Example, Ticket, read_jsonl
from tickettune.pipeline.encoder import IntentEncoder
from tickettune.pipeline.plan import Plan
from tickettune.pipeline.replies import ReplyBank, ReplyPolicy
from tickettune.pipeline.results import Prediction, TrainingStats, write_json_atomic, write_jsonl
from tickettune.pipeline.retrieval import RetrievalIndex, log_softmax
from tickettune.pipeline.weights_folder import (EMBEDDINGS_FILE, EXAMPLE_FIELDS, EXAMPLES_FILE, FORMAT, HISTORY_FILE,
                                                META_FILE, WeightsError, check_embedder, check_vectors, encoder_of,
                                                plan_for_device, read_metadata, stats_from_record, training_record)

log = logging.getLogger(__name__)
KEY_FACT_REFERENCES = 3  # nearest same-intent replies consulted for the grounding check
FALLBACK_REPLY = "Thanks for reaching out! Our support team will follow up on your ticket shortly."


@dataclass(kw_only=True)  # eleven fields: built by name, never by position
class TicketModel:
    plan: Plan                  # base model, device, dtype, method (the plan that actually loaded)
    config: RunConfig
    model: Any                  # PeftModel: adapter "default" (intent), "reply" (when replies were trained)
    tokenizer: Any
    index: RetrievalIndex
    weights: dict[str, float]   # the intent ensemble's weight per expert: encoder, proto, lm (`intent`)
    embedder: str               # the sentence encoder that embedded the index (`embeddings.SentenceEmbedder.name`)
    training: TrainingStats | None = None  # the training block of the run that made it
    info: dict = field(default_factory=dict)  # facts of that run, saved: held-out rows, early stop
    history: list[dict] = field(default_factory=list)  # its loss curve, saved as loss_history.json
    reply_policy: ReplyPolicy = field(default_factory=ReplyPolicy)  # generate or compose, chosen by the run
    encoder: IntentEncoder | None = None  # the fine-tuned intent encoder (None: disabled or unavailable)
    load_lm: Callable | None = field(default=None, repr=False, compare=False)  # `model` not loaded yet: loads it
    adapters: tuple[str, str] = (modeling.INTENT_ADAPTER, modeling.REPLY_ADAPTER)  # (intent, reply) names in `model`

    @property
    def labels(self) -> list[str]:
        return list(self.index.labels)

    @property
    def encoder_choice(self) -> str:
        """The sentence encoder ("minilm" | "mpnet") its index was embedded with: the one `embedder`
        names, else (a user's folder, the hashed stand-in) the config's."""
        from tickettune.pipeline.embeddings import choice_of

        return choice_of(self.embedder) or self.config.encoder.model

    def embed(self, texts: list[str]) -> np.ndarray:
        """`texts` embedded by the encoder of the index (`encoder_choice`), whatever the process chose."""
        from tickettune.pipeline.embeddings import embed

        return embed(texts, choice=self.encoder_choice)

    @cached_property
    def bank(self) -> ReplyBank:
        """The train replies for ranking and composing (sentence embeddings computed once)."""
        examples = self.index.examples
        return ReplyBank([e.intent for e in examples], [e.ticket for e in examples],
                         [e.ideal_reply for e in examples], self.index.vectors, self.index.replies, self.embed)

    # --- prediction ------------------------------------------------------------------------------

    def predict(self, tickets: list[Ticket], deadline: float | None = None) -> tuple[list[Prediction], list[dict]]:
        """Predictions in input order, and one diagnostics record per row (scores, action).
        Rows whose generation would start after `deadline` (monotonic s) get the retrieved reply."""
        if not tickets:
            return [], []
        vectors = self.embed([t.ticket for t in tickets])  # outside the LM's autocast: the encoder's own precision
        with modeling.autocast(self.plan):
            return self._predict(tickets, vectors, deadline)

    def _predict(self, val: list[Ticket], val_vectors: np.ndarray,
                 deadline: float | None) -> tuple[list[Prediction], list[dict]]:
        tickets = [self._ticket_text(t) for t in val]
        t0 = time.perf_counter()
        intents, probs, experts = self._intents(tickets, [t.ticket for t in val], val_vectors)
        intent_s = (time.perf_counter() - t0) / len(val)
        log.info("intent scoring %.1f s (%d tickets x %d labels)", intent_s * len(val), len(val), len(self.labels))
        ranked = [self.bank.rank(v, t.ticket, intent) for v, t, intent in zip(val_vectors, val, intents)]
        written = self.write_replies(tickets, [t.ticket for t in val], val_vectors, ranked, deadline)

        shown = self.labels if self.config.infer.list_labels else None  # the intent prompt as scored
        out, diagnostics, actions = [], [], Counter()
        for row, (t, text, intent, (g, grounded)) in enumerate(zip(val, tickets, intents, written)):
            actions[grounded.action] += 1
            if grounded.action == "fallback":
                log.info("row %r: %s -> the retrieved reply", t.id, grounded.detail)
            intent_tokens = len(prompts.render(self.tokenizer, prompts.intent_messages(text, shown))[0])
            out.append(Prediction(
                id=t.id, prediction=grounded.reply or FALLBACK_REPLY, predicted_intent=intent,
                latency_ms=int(round((intent_s + (g.seconds if g else 0.0)) * 1000)),
                tokens_used=int(intent_tokens + (g.prompt_tokens + g.new_tokens if g else 0)),
            ))
            diagnostics.append({
                "id": t.id, "intent": intent,
                "intent_probs": {lab: round(float(p), 4) for lab, p in zip(self.labels, probs[row])},
                **{f"{name}_logp": {lab: _json_number(x) for lab, x in zip(self.labels, scores[row])}
                   for name, scores in experts.items()},
                "reply_action": grounded.action, "reply_detail": grounded.detail,
                "references": [self.index.examples[i].id for i in ranked[row][:KEY_FACT_REFERENCES]],
                "generated": g.text if g else None,
            })
        log.info("replies: %s", ", ".join(f"{k} {v}" for k, v in sorted(actions.items())))
        return out, diagnostics

    def _intents(self, tickets: list[str], raw: list[str],
                 vectors: np.ndarray) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
        """Predicted intents, the ensemble's probabilities (Q, C) and each expert's log-probabilities.
        The fine-tuned LM scores only each ticket's top candidates of the other experts, and only when
        the ensemble gives it weight (calibrated on the held-out rows): at weight 0 its scores could
        not change an answer."""
        from tickettune.pipeline.intent import candidates, combine, ensemble, score_labels

        cfg, labels = self.config.infer, self.labels
        experts = {"proto": self.index.intent_logprobs(vectors), "logreg": self.index.linear_logprobs(vectors)}
        if self.encoder is not None:
            experts["encoder"] = self.encoder.logprobs(raw)
        if self.weights.get("lm", 0.0) > 0 and len(labels) > 1:
            net = self.language_model()
            with modeling.adapter(net, self.adapters[0]):
                experts["lm"] = score_labels(net, self.tokenizer, tickets, labels, cfg.score_batch_size,
                                             cfg.list_labels, only=candidates(experts, self.weights))
        chosen = combine(experts, self.weights)
        probs = np.exp(log_softmax(ensemble(experts, self.weights)))
        return [labels[c] for c in chosen], probs, experts

    def write_replies(self, tickets: list[str], raw_tickets: list[str], vectors: np.ndarray,
                      ranked: list[list[int]], deadline: float | None = None,
                      policy: ReplyPolicy | None = None) -> list[tuple]:
        """Per ticket, (Generated or None, Grounded): the reply `policy` (default: the run's
        `reply_policy`) writes from the train rows `ranked` for it (most relevant first).
        "retrieve": the composed reply.
        "generate": the reply adapter writes from the top references, grounded in them (and the
        ticket); a failed, degenerate or unsupported generation falls back to the composed reply."""
        from tickettune.pipeline.generate import generate
        from tickettune.pipeline.grounding import RETRIEVED, Grounded, ground

        cfg, policy, bank = self.config.infer, policy or self.reply_policy, self.bank
        composed = [bank.compose(v, rows, policy.extra_sentences, raw)
                    for v, rows, raw in zip(vectors, ranked, raw_tickets)]
        if policy.source != "generate":
            detail = f"composed from the desk's replies (+{policy.extra_sentences} sentences at most)"
            return [(None, Grounded(c, RETRIEVED, detail)) for c in composed]
        net = self.language_model()  # (a policy switched to "generate" after a lean load: the LM loads now)
        refs = [[bank.reference(i, raw) for i in rows[:KEY_FACT_REFERENCES]]
                for rows, raw in zip(ranked, raw_tickets)]
        prompt_ids = [prompts.render(self.tokenizer, prompts.reply_messages(t, r[:cfg.n_references]))[0]
                      for t, r in zip(tickets, refs)]
        t0 = time.perf_counter()
        use = modeling.merged if cfg.merge_adapter else modeling.adapter
        measured = (self.info.get("budget") or {}).get("costs") or {}  # this run's own speed, when measured
        batch_s = measured.get("generate_s_per_reply", 0.0) * min(cfg.gen_batch_size, len(prompt_ids))
        with use(net, self.adapters[1]):
            generated = generate(net, self.tokenizer, prompt_ids, cfg.max_new_tokens, cfg.gen_batch_size,
                                 modeling.end_of_turn_ids(net, self.tokenizer), deadline=deadline, batch_s=batch_s)
        seconds, new_tokens = time.perf_counter() - t0, sum(g.new_tokens for g in generated)
        log.info("generation %.1f s (%d new tokens, %.0f tokens/s)", seconds, new_tokens,
                 new_tokens / max(seconds, 1e-9))
        return [(g, ground(g.text, g.finished, r, repair=cfg.repair_replies, ticket=raw, fallback=c))
                for g, r, raw, c in zip(generated, refs, raw_tickets, composed)]

    def _ticket_text(self, ticket: Ticket) -> str:
        """The ticket as the model reads it: cut to `max_ticket_tokens`, with a warning when cut or empty."""
        text, cut = prompts.truncate_ticket(self.tokenizer, ticket.ticket, self.config.infer.max_ticket_tokens)
        if cut:
            log.warning("ticket %r is longer than %d tokens: truncated", ticket.id, self.config.infer.max_ticket_tokens)
        if not text.strip():
            log.warning("ticket %r is empty: predicting from the empty text", ticket.id)
        return text

    # --- the folder ------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Adapters (PEFT layout), tokenizer, the retrieval index and `tickettune.json` into `folder`."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.model.peft_config:  # portable: the plan's model id, not this machine's path
            self.model.peft_config[name].base_model_name_or_path = self.plan.model
        base = self.model.get_base_model()  # the adapter card names the base model and tags it with it
        base.config.name_or_path = base.name_or_path = self.plan.model
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        if self.encoder is not None:
            self.encoder.save(folder)
        write_jsonl(folder / EXAMPLES_FILE, [asdict(e) for e in self.index.examples])
        vectors = {"tickets": self.index.vectors, "replies": self.index.replies}
        if self.index.name_vectors is not None:
            vectors["names"] = self.index.name_vectors
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in vectors.items()},
                  str(folder / EMBEDDINGS_FILE))
        write_json_atomic(folder / HISTORY_FILE, self.history)
        write_json_atomic(folder / META_FILE, self.metadata())  # last: a folder with it is complete

    def metadata(self) -> dict:
        import peft
        import torch
        import transformers

        return {
            "format": FORMAT, "tickettune": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "plan": self.plan.to_dict(), "config": self.config.to_dict(), "taxonomy": self.labels,
            "embedder": self.embedder, "embedding_temperature": self.index.temperature,
            "ensemble_weights": self.weights, "intent_encoder": self.encoder is not None,
            "reply_policy": self.reply_policy.to_dict(), "reply_adapter": modeling.REPLY_ADAPTER in self.model.peft_config,
            "training": training_record(self.training), **self.info, "loss_history": HISTORY_FILE,
            "prompts": {"intent_system": prompts.INTENT_SYSTEM, "reply_system": prompts.REPLY_SYSTEM},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        }

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None, *, shared: Any = None,
             key: str = "") -> "TicketModel":
        """The model saved in `folder`, on `device` ("cpu" or "cuda"; default: a GPU when there is one).
        Raises `WeightsError` naming what is missing or incompatible before loading any model.
        `shared` (a `bases.SharedBases`): its adapters load onto the process's one copy of each base
        model, under names made from `key` (serving many desks); without it, the model owns its bases."""
        folder = Path(folder)
        meta = read_metadata(folder)
        plan = plan_for_device(Plan(**meta["plan"]), device)
        config = RunConfig.from_dict(meta["config"])
        examples = [Example(**o) for _, o in read_jsonl(folder / EXAMPLES_FILE, EXAMPLE_FIELDS)]
        from safetensors.numpy import load_file

        vectors = load_file(str(folder / EMBEDDINGS_FILE))
        check_vectors(folder, vectors, len(examples), len(meta["taxonomy"]))
        names = dict(zip(meta["taxonomy"], vectors["names"])) if "names" in vectors else None
        index = RetrievalIndex.fit(examples, vectors["tickets"], vectors["replies"], names)
        if list(index.labels) != meta["taxonomy"]:
            raise WeightsError(f"{folder / EXAMPLES_FILE}: its intents do not match the taxonomy in {META_FILE}")
        config = encoder_of(meta["embedder"], config)
        check_embedder(meta["embedder"], folder, config.encoder.model, vectors["tickets"].shape[1])
        weights = {k: float(v) for k, v in meta["ensemble_weights"].items()}
        policy = ReplyPolicy(**meta["reply_policy"])

        adapters = shared.adapter_names(key) if shared is not None else cls.adapters

        def load_lm():  # the base model and the adapters
            modeling.seed_everything(config.seed, plan.device)
            if shared is not None:
                return shared.lm(plan, folder, key)[:2]
            base, tokenizer = modeling.load_base(plan)
            return modeling.load_adapter(base, folder), tokenizer

        if weights.get("lm", 0.0) > 0 or policy.source == "generate":
            (model, tokenizer), later = load_lm(), None
        else:  # the LM scores nothing and writes nothing: its tokenizer (saved here) is all predict needs
            model, tokenizer, later = None, modeling.load_tokenizer(folder), load_lm
        encoder = IntentEncoder.load(folder, list(index.labels), config.encoder.max_length, config.encoder.model,
                                     shared=shared, key=key) if meta.get("intent_encoder") else None
        return cls(plan=plan, config=config, model=model, tokenizer=tokenizer, index=index, weights=weights,
                   embedder=meta["embedder"], training=stats_from_record(meta.get("training")),
                   info={k: meta[k] for k in ("holdout_rows", "stopped_early", "budget") if k in meta},
                   reply_policy=policy, encoder=encoder, load_lm=later, adapters=adapters)

    def language_model(self):
        """The LoRA-tuned LM (a PeftModel), loaded on first use when `load` could leave it out (a model
        whose replies are composed and whose LM has no intent weight: `predict` never touches it)."""
        if self.model is None and self.load_lm is not None:
            self.model, self.tokenizer = self.load_lm()
            self.load_lm = None
        return self.model


def _json_number(x) -> float | None:
    """A score for the diagnostics file: rounded, None where not finite (strict JSON has no NaN)."""
    return round(float(x), 4) if np.isfinite(x) else None


def retrieval_only(index: RetrievalIndex, val: list[Ticket]) -> list[Prediction]:
    """The safety net when a model stage fails: the embedding classifier's intent and the nearest
    train reply of that intent, one per row, in input order (no language model needed)."""
    from tickettune.pipeline.embeddings import embed

    if not val:
        return []
    labels = list(index.labels)
    val_vectors = embed([t.ticket for t in val])
    chosen = index.intent_logprobs(val_vectors).argmax(1)
    out = []
    for t, v, c in zip(val, val_vectors, chosen):
        rows = index.nearest(v, labels[c], k=1)
        reply = index.examples[rows[0]].ideal_reply.strip() if rows else FALLBACK_REPLY
        out.append(Prediction(id=t.id, prediction=reply, predicted_intent=labels[c], latency_ms=0, tokens_used=0))
    return out
