"""The budget phase of `fit`: this machine's costs, measured on a few real rows (`measure_costs`),
and the training plan for the time left (`plan_budget`; `encoder_deadline` for the intent
encoder's share). The arithmetic is `budget`'s (pure: no model, no clock); this module measures,
reads the clock and logs.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace

from tickettune.pipeline import budget, intent, modeling, prompts, train
from tickettune.pipeline.calibration import lm_scores_matter
from tickettune.pipeline.replies import HELDOUT_REPLIES
from tickettune.pipeline.ticket_model import TicketModel

log = logging.getLogger(__name__)
PROBE_TICKETS = 4       # tickets scored to measure the scoring cost
PROBE_NEW_TOKENS = 4    # decoding steps timed to measure the generation cost
PROBE_PROMPTS = 8       # prompts in that timed batch (at most prediction's: per reply, pessimistic)
DECODE_GROWTH = 1.5     # later decoding steps attend over more positions: on the 135M model at 120 new
                        # tokens a step cost ~1.8x the first few (bitext replies, 2-core CPU)


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


def measure_costs(model: TicketModel, seqs: list, held: set[int], *, generation: bool,
                  scoring: bool = True) -> budget.Costs:
    """This machine's costs, measured on a few real rows: a forward and backward pass of an intent
    and a reply batch (gradients thrown away: nothing is learnt), scoring a few tickets (`scoring`:
    when the LM's label scores can matter, `calibration.lm_scores_matter`; else they cost 0), and a
    few decoding steps of a generation batch (`generation`: when the run may generate)."""
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
    score_s = _scoring_seconds(model) if scoring else 0.0
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


def _scoring_seconds(model: TicketModel) -> float:
    """Seconds to score one ticket's candidate labels (as prediction scores them), on a few tickets."""
    cfg, net, tokenizer = model.config, model.model, model.tokenizer
    tickets = [e.ticket for e in model.index.examples[:PROBE_TICKETS]]
    with modeling.autocast(model.plan), modeling.adapter(net, modeling.INTENT_ADAPTER):
        only = [list(range(min(intent.TOP_K, len(model.index.labels))))] * len(tickets)  # as prediction scores
        return min(_seconds(lambda: intent.score_labels(net, tokenizer, tickets, list(model.index.labels),
                                                         cfg.infer.score_batch_size, cfg.infer.list_labels, only=only))
                   for _ in range(2)) / len(tickets)  # the second call is warm


def encoder_deadline(model: TicketModel, seqs: list, held: set[int], val_rows: int, costs: budget.Costs | None,
                     deadline: float | None) -> float | None:
    """When the intent encoder must stop training: after `encoder.time_share` of the time left, or
    after `encoder.time_share_alone` when the LM's training cannot help intents as much: its label
    scores cannot matter (`calibration.lm_scores_matter`: the CPU plan, its weight fixed at 0), or
    the LM adapters could not train a single step in the time the smaller share leaves (the measured
    plan says so: many val tickets to score, a short budget). Binds only where the budget does (large
    desks, short budgets). None without a deadline."""
    if deadline is None:
        return None
    now = time.monotonic()
    share = model.config.encoder.time_share
    if not lm_scores_matter(model.config):
        share = max(share, model.config.encoder.time_share_alone)
        log.info("intent encoder: up to %.0f%% of the time left (the LM's label scores cannot change an intent "
                 "here: its weight is fixed at 0)", 100 * share)
    elif costs is not None:
        after = plan_budget(model, seqs, held, val_rows=val_rows, costs=costs, deadline=now + (1 - share) * (deadline - now),
                            quiet=True)
        if not after.trains:
            share = max(share, model.config.encoder.time_share_alone)
            log.info("intent encoder: %.0f%% of the time left (the adapters cannot train in what %.0f%% would "
                     "leave: %s)", 100 * share, 100 * model.config.encoder.time_share, after.reason)
    return now + share * (deadline - now)


def _seconds(work) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0
