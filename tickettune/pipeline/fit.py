"""The training recipe: from a loaded base model and the train rows to a `TicketModel`.

Phases, in order (each a call below, none hidden in a callback):
1. attach two fresh LoRA adapters (seeded: PEFT initialises them from the global RNG) and measure
   this machine's costs (`measure_costs`);
2. fine-tune the intent encoder, for the share of the time the budget leaves it (`encoder_deadline`);
3. train the *intent* adapter on ticket -> label (+ noisy copies), never on the held-out rows;
4. calibrate: the embedding experts count equally; the LM, scored on the held-out rows (+ noisy
   copies), must earn its weight there beyond chance (`intent.ensemble_weights`);
5. train the *reply* adapter on retrieved replies + ticket -> ideal reply, also never on the
   held-out rows;
6. choose the reply policy from evidence the run measures itself (`replies`): how many sentences
   a composed reply borrows, leave-one-out over the train rows; then whether the reply adapter
   writes replies at all: it generates for the held-out rows, and its grounded generations must
   beat the composed replies there by `replies.proxy_quality`, beyond chance (a one-sided paired
   t-test at 5 %, `replies.generation_wins`), or the run composes. So a 135M model
   on a CPU may compose where a 7B model on a GPU generates, with no setting changed.
See `train` for the loop and val_loss, `intent` for the ensemble. Does not load or save models.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import replace

import numpy as np

from tickettune.pipeline import budget, intent, modeling, prompts, replies, train
from tickettune.pipeline import encoder as encoder_module
from tickettune.pipeline import plan as plan_module
from tickettune.pipeline.config import RunConfig
from tickettune.pipeline.embeddings import embed, load_embedder
from tickettune.pipeline.encoder import IntentEncoder
from tickettune.pipeline.plan import Plan
from tickettune.pipeline.replies import ReplyPolicy
from tickettune.pipeline.results import TrainingStats
from tickettune.pipeline.retrieval import RetrievalIndex
from tickettune.pipeline.ticket_model import TicketModel

log = logging.getLogger(__name__)
HELDOUT_REPLIES = 16    # held-out rows the reply policy generates for, at most
PROBE_TICKETS = 4       # tickets scored to measure the scoring cost
PROBE_NEW_TOKENS = 4    # decoding steps timed to measure the generation cost
PROBE_PROMPTS = 8       # prompts in that timed batch (at most prediction's: per reply, pessimistic)
DECODE_GROWTH = 1.5     # later decoding steps attend over more positions: on the 135M model at 120 new
                        # tokens a step cost ~1.8x the first few (bitext replies, 2-core CPU)


def fit(base, tokenizer, plan: Plan, cfg: RunConfig, index: RetrievalIndex, *, val_rows: int = 0,
        deadline: float | None = None) -> TicketModel:
    """Train both adapters on `base` (which becomes the PeftModel inside the result), calibrate the
    ensemble on the held-out rows, choose the reply policy, and return the trained `TicketModel`.
    `deadline` (monotonic s) is when the whole run must end, `val_rows` how many tickets it must
    still predict: the budget plan (`budget`) sizes training to leave prediction its time. The
    caller, who owns the clock, fills in `training.wall_clock_s`."""
    examples = list(index.examples)
    held = train.holdout_rows(examples, cfg.train.holdout_frac, cfg.seed, cfg.train.holdout_max)
    trained = TicketModel(plan=plan, config=cfg, model=None, tokenizer=tokenizer, index=index, weights={},
                          embedder=load_embedder().name)
    modeling.seed_everything(cfg.seed, plan.device)  # PEFT initialises LoRA from the global RNG
    model = trained.model = modeling.add_lora(base, cfg.train)
    seqs = train.build_sequences(examples, tokenizer, cfg.train,
                                 references=reference_replies(trained, cfg.infer.n_references),
                                 labels_in_prompt=list(index.labels) if cfg.infer.list_labels else None,
                                 max_ticket_tokens=cfg.infer.max_ticket_tokens, seed=cfg.seed)
    costs = measure_costs(trained, seqs, held, cfg.infer.reply_source != "retrieve") if deadline else None
    with torch_rng_kept():  # the encoder seeds torch itself; the adapters' draws stay as without it
        encoder = trained.encoder = fit_encoder(index, held, cfg, plan, encoder_deadline(
            trained, seqs, held, val_rows, costs, deadline))
    schedule = plan_budget(trained, seqs, held, val_rows=val_rows, costs=costs, deadline=deadline)  # both adapters
    run = dict(cfg=cfg.train, seed=cfg.seed, autocast=lambda: modeling.training_context(plan))

    parts = []
    if schedule.intent_epochs:
        with modeling.adapter(model, modeling.INTENT_ADAPTER):
            parts.append(train.train(model, tokenizer, _rows(seqs, "intent", schedule, held), held,
                                     epochs=schedule.intent_epochs, task="intent",
                                     deadline=_reserve_end(deadline, schedule), **run))
    lm_trained = bool(parts and parts[0].steps)
    trained.weights = calibrate(trained, held, lm_trained)
    if encoder is not None:  # calibrated without the held-out rows; the head now learns from every row
        texts, y = training_texts_of(index, set(), cfg)
        encoder.refit_head(texts, y, cfg.encoder)
    if deadline:  # again for the reply adapter: the time intent training really took, and whether
        # prediction will score labels at all (an LM weight of 0 needs no label scores)
        schedule = plan_budget(trained, seqs, held, val_rows=val_rows, costs=costs, deadline=deadline, intent_done=True,
                               score_val=trained.weights.get("lm", 0.0) > 0, first=schedule)
    if schedule.reply_epochs and _rows(seqs, "reply", schedule, held):
        with modeling.adapter(model, modeling.REPLY_ADAPTER):
            parts.append(train.train(model, tokenizer, _rows(seqs, "reply", schedule, held), held,
                                     epochs=schedule.reply_epochs, task="reply",
                                     deadline=_reserve_end(deadline, schedule), **run))
    result = train.combine(parts)
    log.info("%d steps, %d tokens, train_loss %.4f, val_loss %.4f (%d held-out rows), ensemble weights %s",
             result.steps, result.tokens, result.train_loss, result.val_loss, len(held), trained.weights)
    trained.training = TrainingStats(result.steps, result.train_loss, result.val_loss, wall_clock_s=float("nan"))
    trained.info = {"holdout_rows": sorted(held), "stopped_early": result.stopped_early,
                    "budget": schedule.to_dict()}
    trained.history = result.history
    trained.reply_policy = choose_reply_policy(trained, held, _reserve_end(deadline, schedule))
    return trained


def _rows(seqs: list, task: str, schedule: budget.TrainingPlan, held: set[int]) -> list:
    """`task`'s sequences of the rows the plan trains on, and of the held-out rows (measured, never trained on)."""
    keep = set(schedule.rows) | held
    return [s for s in seqs if s.task == task and s.row in keep]


def _reserve_end(deadline: float | None, schedule: budget.TrainingPlan) -> float | None:
    """When training must stop to leave the plan's reserve (None without a deadline)."""
    return None if deadline is None else deadline - schedule.reserve_s


def plan_budget(model: TicketModel, seqs: list, held: set[int], *, val_rows: int, costs: budget.Costs | None,
                deadline: float | None, intent_done: bool = False, score_val: bool = True,
                first: budget.TrainingPlan | None = None, quiet: bool = False) -> budget.TrainingPlan:
    """The training plan for the time left (everything, without a deadline), logged with its reason
    (`quiet`: not logged).
    `intent_done`: the intent adapter has trained and been calibrated on (`first` is its plan),
    so only the reply adapter is planned; `score_val`: prediction will score labels."""
    cfg = model.config
    tokens = {task: [0] * len(model.index.examples) for task in ("intent", "reply")}
    for s in seqs:
        if s.row not in held:
            tokens[s.task][s.row] += len(s.input_ids)
    reply_epochs = cfg.train.reply_epochs if any(tokens["reply"]) else 0
    work = budget.Workload(tuple(tokens["intent"]), tuple(tokens["reply"]),
                           tuple(e.intent for e in model.index.examples), 0 if intent_done else cfg.train.epochs,
                           reply_epochs, val_rows, 0 if intent_done else len(held) * (1 + cfg.train.augment_copies),
                           min(len(held), HELDOUT_REPLIES), score_val_rows=score_val)
    if deadline is None or costs is None:
        return budget.plan_training(work, budget.Costs(0.0, 0.0, 0.0, 0.0), 1.0, model.index.vectors, exclude=held,
                                    measured=False)
    schedule = budget.plan_training(work, costs, deadline - time.monotonic(), model.index.vectors, exclude=held)
    if intent_done and first is not None:  # one record: the intent adapter's part of the first plan stays
        schedule = replace(schedule, intent_epochs=first.intent_epochs,
                           reason=f"intent adapter: {first.reason}; reply adapter: {schedule.reason}")
    if quiet:
        return schedule
    log.info("budget%s: %s (measured: %.2f ms per intent token, %.2f ms per reply token, %.2f s per ticket "
             "scored, %.2f s per reply generated)", " (reply adapter)" if intent_done else "", schedule.reason,
             1e3 * costs.intent_s_per_token, 1e3 * costs.reply_s_per_token, costs.score_s_per_ticket,
             costs.generate_s_per_reply)
    return schedule


def measure_costs(model: TicketModel, seqs: list, held: set[int], generation: bool) -> budget.Costs:
    """This machine's costs, measured on a few real rows: a forward and backward pass of an intent
    and a reply batch (gradients thrown away: nothing is learnt), scoring a few tickets, and a few
    decoding steps of a generation batch (`generation`: when the run may generate)."""
    cfg, plan, net, tokenizer = model.config, model.plan, model.model, model.tokenizer
    per_token = {}
    for task, adapter in (("intent", modeling.INTENT_ADAPTER), ("reply", modeling.REPLY_ADAPTER)):
        task_seqs = [s for s in seqs if s.task == task and s.row not in held]
        if not task_seqs:
            per_token[task] = 0.0
            continue
        batch = train.batches(task_seqs, cfg.train.batch_size, random.Random(cfg.seed), cfg.train.max_batch_tokens)[0]
        with modeling.adapter(net, adapter):
            per_token[task] = train.time_step(net, tokenizer, batch, lambda: modeling.training_context(plan)) \
                / sum(len(s.input_ids) for s in batch)
    tickets = [e.ticket for e in model.index.examples[:PROBE_TICKETS]]
    with modeling.autocast(plan), modeling.adapter(net, modeling.INTENT_ADAPTER):
        only = [list(range(min(intent.TOP_K, len(model.index.labels))))] * len(tickets)  # as prediction scores
        score_s = min(_seconds(lambda: intent.score_labels(net, tokenizer, tickets, list(model.index.labels),
                                                            cfg.infer.score_batch_size, cfg.infer.list_labels, only=only))
                      for _ in range(2)) / len(tickets)  # the second call is warm
    generate_s = 0.0
    if generation:
        from tickettune.pipeline.generate import generate

        examples = model.index.examples[:min(PROBE_PROMPTS, cfg.infer.gen_batch_size)]
        prompt_ids = [prompts.render(tokenizer, prompts.reply_messages(e.ticket, [e.ideal_reply]))[0] for e in examples]
        stop = modeling.end_of_turn_ids(net, tokenizer)
        with modeling.autocast(plan), modeling.adapter(net, modeling.REPLY_ADAPTER):
            prefill = _seconds(lambda: generate(net, tokenizer, prompt_ids, 1, len(prompt_ids), stop))
            longer = _seconds(lambda: generate(net, tokenizer, prompt_ids, 1 + PROBE_NEW_TOKENS, len(prompt_ids), stop))
        step = max(0.0, longer - prefill) / PROBE_NEW_TOKENS   # one decoding step of the whole batch
        generate_s = (prefill + DECODE_GROWTH * step * cfg.infer.max_new_tokens) / len(prompt_ids)
    return budget.Costs(per_token["intent"], per_token["reply"], score_s, generate_s)


def reference_replies(model: TicketModel, k: int) -> list[list[str]]:
    """Per train row, the `k` most relevant other replies of its intent, personalised to its ticket
    (`ReplyBank.reference`): the reply task's references."""
    bank, examples = model.bank, model.index.examples
    return [[bank.reference(j, e.ticket) for j in bank.rank(v, e.ticket, e.intent, exclude=i)[:k]]
            for i, (e, v) in enumerate(zip(examples, model.index.vectors))]


def choose_reply_policy(model: TicketModel, held: set[int], deadline: float | None = None) -> ReplyPolicy:
    """The run's reply policy (see the module docstring), with the numbers it was chosen by. Generation
    is measured on at most HELDOUT_REPLIES held-out rows; a row whose generation would end after
    `deadline` is not generated and counts as no gain."""
    bank, examples, forced = model.bank, model.index.examples, model.config.infer.reply_source
    k, loo = replies.choose_extra_sentences(bank, [e.ticket for e in examples], embed)
    evidence: dict = {"extra_sentences_loo": {str(n): q for n, q in loo.items()}}
    if forced != "auto":
        return ReplyPolicy(forced, k, evidence | {"source": f"set by infer.reply_source={forced}"})
    if not held:  # e.g. one row per intent, where generation measured level with composing or above (README)
        return ReplyPolicy("generate", k, evidence | {"source": "no held-out rows to measure on: generate"})
    rows = sorted(held)[:HELDOUT_REPLIES]
    ranked = [bank.rank(model.index.vectors[i], examples[i].ticket, examples[i].intent, exclude=i) for i in rows]
    texts = [prompts.truncate_ticket(model.tokenizer, examples[i].ticket, model.config.infer.max_ticket_tokens)[0]
             for i in rows]
    with modeling.autocast(model.plan):
        written = model.write_replies(texts, [examples[i].ticket for i in rows], model.index.vectors[rows], ranked,
                                      deadline, policy=ReplyPolicy("generate", k))
    generated = [grounded.reply for _, grounded in written]
    composed = [bank.compose(model.index.vectors[i], r, k, examples[i].ticket) for i, r in zip(rows, ranked)]
    vectors = embed(generated + composed)
    pairs = [(replies.proxy_quality(g, bank.replies[i], gv, bank.reply_vectors[i]),
              replies.proxy_quality(c, bank.replies[i], cv, bank.reply_vectors[i]))
             for g, c, gv, cv, i in zip(generated, composed, vectors[:len(rows)], vectors[len(rows):], rows)]
    source = "generate" if replies.generation_wins(pairs) else "retrieve"
    means = np.mean(pairs, axis=0)
    log.info("reply policy: %s (held-out proxy quality: generated %.3f, composed %.3f over %d rows; "
             "composed replies borrow up to %d sentences)", source, means[0], means[1], len(rows), k)
    return ReplyPolicy(source, k, evidence | {"heldout_rows": len(rows),
                                              "heldout_proxy_quality": {"generate": round(float(means[0]), 4),
                                                                        "retrieve": round(float(means[1]), 4)},
                                              "heldout_pairs": [[round(g, 4), round(c, 4)] for g, c in pairs],
                                              "heldout_actions": dict(Counter(g.action for _, g in written))})


def _seconds(work) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def calibrate(model: TicketModel, held: set[int], lm_trained: bool) -> dict[str, float]:
    """The intent ensemble's weights (`intent.ensemble_weights`): the embedding experts
    (`intent.weighed_experts`: the prototypes only when the desk's replies are there) at equal
    weight, and the LM at a weight its held-out scores earn beyond chance, or 0. The held-out rows
    (and noisy copies of them) were never seen by the encoder, its head or the intent adapter; the
    frozen experts are refitted without them. Without held-out rows there is nothing to measure:
    the LM, whose worth is unknown, gets no weight.
    `infer.calibrate_lm_weight` false fixes the LM's weight at `infer.lm_weight`."""
    cfg, index = model.config, model.index
    fixed_lm = None if cfg.infer.calibrate_lm_weight else cfg.infer.lm_weight
    replies_said = any(e.ideal_reply.strip() for e in index.examples)
    names = intent.weighed_experts(replies_said, model.encoder is not None)
    if not held or len(index.labels) < 2:
        return intent.prior_weights(names, replies_said) | {
            "lm": fixed_lm if fixed_lm is not None and lm_trained else 0.0}
    texts, gold, rows = intent.heldout_queries(list(index.examples), held, cfg.train.augment_copies, cfg.seed)
    rest, vectors = index.without(held), embed(texts)
    scorers = {"proto": lambda: rest.intent_logprobs(vectors), "logreg": lambda: rest.linear_logprobs(vectors),
               "encoder": lambda: model.encoder.logprobs(texts)}
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


def training_texts_of(index: RetrievalIndex, held: set[int], cfg: RunConfig) -> tuple[list[str], np.ndarray]:
    """The intent encoder's training texts and label indices, from every train row but `held`."""
    rows = [e for i, e in enumerate(index.examples) if i not in held]
    return encoder_module.training_texts([e.ticket for e in rows], [e.intent for e in rows], list(index.labels),
                                         cfg.encoder, cfg.seed)


def encoder_deadline(model: TicketModel, seqs: list, held: set[int], val_rows: int, costs: budget.Costs | None,
                     deadline: float | None) -> float | None:
    """When the intent encoder must stop training: after `encoder.time_share` of the time left, or,
    when the LM adapters could not train a single step in the time that share leaves (the measured
    plan says so: many val tickets to score, a short budget), after `encoder.time_share_alone`: the
    LM would not use the rest, so the encoder does. None without a deadline."""
    if deadline is None:
        return None
    now = time.monotonic()
    share = model.config.encoder.time_share
    if costs is not None:
        after = plan_budget(model, seqs, held, val_rows=val_rows, costs=costs, deadline=now + (1 - share) * (deadline - now),
                            quiet=True)
        if not after.trains:
            share = max(share, model.config.encoder.time_share_alone)
            log.info("intent encoder: %.0f%% of the time left (the adapters cannot train in what %.0f%% would "
                     "leave: %s)", 100 * share, 100 * model.config.encoder.time_share, after.reason)
    return now + share * (deadline - now)


@contextlib.contextmanager
def torch_rng_kept():
    """Torch's global RNG state (CPU and CUDA) as it was before the block."""
    import torch

    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # 0 devices without CUDA
        yield


def fit_encoder(index: RetrievalIndex, held: set[int], cfg: RunConfig, plan: Plan,
                until: float | None) -> IntentEncoder | None:
    """The fine-tuned intent encoder, on every train row but the held-out ones, training until
    `until` (monotonic s; `encoder_deadline`) at the latest; None when disabled, when there is one
    intent only, or when the bundled encoder is not there (the prototypes then stand alone)."""
    if not cfg.encoder.enabled or len(index.labels) < 2:
        return None
    texts, y = training_texts_of(index, held, cfg)
    settings = replace(cfg.encoder, bf16=cfg.encoder.bf16 and plan_module.cpu_has_bf16())
    try:
        return IntentEncoder.fit(texts, y, list(index.labels), settings, seed=cfg.seed, deadline=until)
    except (OSError, RuntimeError) as exc:  # e.g. no bundled MiniLM: the hashed stand-in cannot be tuned
        log.warning("no intent encoder (%s): the prototype classifier is the embedding expert",
                    str(exc).splitlines()[0][:200])
        return None
