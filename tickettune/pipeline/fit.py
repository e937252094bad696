"""The training recipe: from a loaded base model and the train rows to a `TicketModel`.

Phases, in order (each a call below, each owned by its module; none hidden in a callback):
1. attach two fresh LoRA adapters (seeded: PEFT initialises them from the global RNG) and measure
   this machine's costs (`time_budget.measure_costs`);
2. fine-tune the intent encoder, for the share of the time the budget leaves it
   (`time_budget.encoder_deadline`, `fit_encoder`);
3. plan training for the time left (`time_budget.plan_budget`) and train the *intent* adapter on
   ticket -> label (+ noisy copies), never on the held-out rows (`train`);
4. calibrate: the embedding experts count equally; the LM, scored on the held-out rows (+ noisy
   copies), must earn its weight there beyond chance (`calibration.calibrate`);
5. plan again and train the *reply* adapter on retrieved replies + ticket -> ideal reply, also
   never on the held-out rows;
6. choose the reply policy from evidence the run measures itself (`reply_policy`): how many
   sentences a composed reply borrows, and whether the reply adapter's grounded generations beat
   the composed replies on the held-out rows beyond chance, or the run composes. So a 135M model
   on a CPU may compose where a 7B model on a GPU generates, with no setting changed.
Each phase returns what it decides; `fit` assembles the `TicketModel` from those decisions. See
`train` for the loop and val_loss, `intent` for the ensemble. Does not load or save models.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import numpy as np

from tickettune.pipeline import budget, modeling, train
from tickettune.pipeline import encoder as encoder_module
from tickettune.pipeline import plan as plan_module
from tickettune.pipeline.calibration import calibrate, lm_scores_matter
from tickettune.pipeline.config import RunConfig
from tickettune.pipeline.embeddings import load_embedder
from tickettune.pipeline.encoder import IntentEncoder
from tickettune.pipeline.plan import Plan
from tickettune.pipeline.replies import RETRIEVE
from tickettune.pipeline.reply_policy import choose_reply_policy
from tickettune.pipeline.results import TrainingStats
from tickettune.pipeline.retrieval import RetrievalIndex
from tickettune.pipeline.ticket_model import TicketModel
from tickettune.pipeline.time_budget import encoder_deadline, measure_costs, plan_budget

log = logging.getLogger(__name__)


def fit(base, tokenizer, plan: Plan, cfg: RunConfig, index: RetrievalIndex, *, val_rows: int = 0,
        deadline: float | None = None) -> TicketModel:
    """Train both adapters on `base` (which becomes the PeftModel inside the result), calibrate the
    ensemble on the held-out rows, choose the reply policy, and return the trained `TicketModel`.
    `deadline` (monotonic s) is when the whole run must end, `val_rows` how many tickets it must
    still predict: the budget plan (`budget`) sizes training to leave prediction its time. The
    caller, who owns the clock, fills in `training.wall_clock_s`."""
    examples = list(index.examples)
    held = train.holdout_rows(examples, cfg.train.holdout_frac, cfg.seed, cfg.train.holdout_max)
    embedder = load_embedder().name
    modeling.seed_everything(cfg.seed, plan.device)  # PEFT initialises LoRA from the global RNG
    draft = TicketModel(plan=plan, config=cfg, model=modeling.add_lora(base, cfg.train), tokenizer=tokenizer,
                        index=index, weights={}, embedder=embedder)  # what the phases read; nothing decided yet
    seqs = train.build_sequences(examples, tokenizer, cfg.train,
                                 references=reference_replies(draft, cfg.infer.n_references),
                                 labels_in_prompt=list(index.labels) if cfg.infer.list_labels else None,
                                 max_ticket_tokens=cfg.infer.max_ticket_tokens, seed=cfg.seed)
    costs = measure_costs(draft, seqs, held, generation=cfg.infer.reply_source != RETRIEVE,
                          scoring=lm_scores_matter(cfg)) if deadline else None
    with torch_rng_kept():  # the encoder seeds torch itself; the adapters' draws stay as without it
        encoder = fit_encoder(index, held, cfg, plan, encoder_deadline(draft, seqs, held, val_rows, costs, deadline))
    schedule = plan_budget(draft, seqs, held, val_rows=val_rows, costs=costs, deadline=deadline)  # both adapters
    intent_part = _train_adapter(draft, seqs, held, "intent", schedule, deadline)
    weights = calibrate(draft, held, encoder=encoder, lm_trained=bool(intent_part and intent_part.steps))
    if encoder is not None:  # calibrated without the held-out rows; the head now learns from every row
        texts, y = training_texts_of(index, set(), cfg)
        encoder.refit_head(texts, y, cfg.encoder)
    if deadline:  # again for the reply adapter: the time intent training really took, and whether
        # prediction will score labels at all (an LM weight of 0 needs no label scores)
        schedule = plan_budget(draft, seqs, held, val_rows=val_rows, costs=costs, deadline=deadline,
                               intent_done=True, score_val=weights.get("lm", 0.0) > 0, first=schedule)
    reply_part = _train_adapter(draft, seqs, held, "reply", schedule, deadline)
    result = train.combine([part for part in (intent_part, reply_part) if part is not None])
    log.info("%d steps, %d tokens, train_loss %.4f, val_loss %.4f (%d held-out rows), ensemble weights %s",
             result.steps, result.tokens, result.train_loss, result.val_loss, len(held), weights)
    trained = _decided(draft, encoder=encoder, weights=weights, history=result.history,
                       training=TrainingStats(result.steps, result.train_loss, result.val_loss,
                                              wall_clock_s=float("nan")),
                       info={"holdout_rows": sorted(held), "stopped_early": result.stopped_early,
                             "budget": schedule.to_dict()})
    return _decided(trained, reply_policy=choose_reply_policy(trained, held, _reserve_end(deadline, schedule)))


def _train_adapter(model: TicketModel, seqs: list, held: set[int], task: str, schedule: budget.TrainingPlan,
                   deadline: float | None) -> train.TrainResult | None:
    """The `task` ("intent" | "reply") adapter of `model.model`, trained as `schedule` plans it (until
    its reserve); None when the plan gives it no epochs (the reply adapter: or no rows)."""
    epochs = schedule.intent_epochs if task == "intent" else schedule.reply_epochs
    if not epochs or (task == "reply" and not _rows(seqs, task, schedule, held)):
        return None
    cfg, net = model.config, model.model
    with modeling.adapter(net, modeling.INTENT_ADAPTER if task == "intent" else modeling.REPLY_ADAPTER):
        return train.train(net, model.tokenizer, _rows(seqs, task, schedule, held), held, cfg=cfg.train,
                           epochs=epochs, seed=cfg.seed, deadline=_reserve_end(deadline, schedule),
                           autocast=lambda: modeling.training_context(model.plan), task=task)


def _decided(model: TicketModel, **fields) -> TicketModel:
    """`model` with the fields a phase decided; its reply bank (built from the index alone, its
    sentence embeddings computed as used) carried over rather than built again."""
    out = replace(model, **fields)
    if "bank" in vars(model):
        vars(out)["bank"] = model.bank
    return out


def _rows(seqs: list, task: str, schedule: budget.TrainingPlan, held: set[int]) -> list:
    """`task`'s sequences of the rows the plan trains on, and of the held-out rows (measured, never trained on)."""
    keep = set(schedule.rows) | held
    return [s for s in seqs if s.task == task and s.row in keep]


def _reserve_end(deadline: float | None, schedule: budget.TrainingPlan) -> float | None:
    """When training must stop to leave the plan's reserve (None without a deadline)."""
    return None if deadline is None else deadline - schedule.reserve_s


def reference_replies(model: TicketModel, k: int) -> list[list[str]]:
    """Per train row, the `k` most relevant other replies of its intent, personalised to its ticket
    (`ReplyBank.reference`): the reply task's references."""
    bank, examples = model.bank, model.index.examples
    return [[bank.reference(j, e.ticket) for j in bank.rank(v, e.ticket, e.intent, exclude=i)[:k]]
            for i, (e, v) in enumerate(zip(examples, model.index.vectors))]


def training_texts_of(index: RetrievalIndex, held: set[int], cfg: RunConfig) -> tuple[list[str], np.ndarray]:
    """The intent encoder's training texts and label indices, from every train row but `held`."""
    rows = [e for i, e in enumerate(index.examples) if i not in held]
    return encoder_module.training_texts([e.ticket for e in rows], [e.intent for e in rows], list(index.labels),
                                         cfg.encoder, cfg.seed)


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
