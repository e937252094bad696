"""The time budget: measured costs in, a training plan out — how many rows train the adapters, for
how many epochs — so that training and prediction share the run's wall-clock sensibly.

Costs are measured on this machine, not assumed (`Costs`, filled by `time_budget.measure_costs`): seconds
per training token of each adapter, seconds per ticket of intent scoring, and seconds per generated
reply. The plan (`plan_training`):
1. The *mandatory* work is reserved first: scoring the held-out rows for the calibration and
   every val ticket at prediction (when the ensemble uses label scores); it cannot be skipped.
2. When everything fits — the full training schedule, that reserve, and generated replies for the
   held-out rows (the reply policy's evidence) and every val row — nothing is cut.
3. Otherwise training gets what generation leaves, but never less than half of what the reserve
   leaves (`MIN_TRAIN_SHARE`): a run with many val rows still fine-tunes. Generation is the part
   that gives way: held-out or val replies that do not fit in time are composed from the desk's
   replies instead (`generate`'s deadline; for the policy, a row not generated counts as no gain).
4. Within its share, training first drops epochs (down to one), then rows: the adapters train on
   a representative, diverse subset per intent (`curate`), while the retrieval index and the
   embedding classifier keep every row.
5. When not even one step fits, nothing trains, and the plan says why.

Pure arithmetic over measured numbers: no model, no clock (the caller passes the seconds left).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MIN_TRAIN_SHARE = 0.5     # of the time the mandatory prediction work leaves
SAFETY = 0.85             # plan to 85 % of the time left: estimates come from a few steps


@dataclass(frozen=True)
class Costs:
    intent_s_per_token: float   # one training token (forward + backward + update) of the intent task
    reply_s_per_token: float    # the same for the reply task
    score_s_per_ticket: float   # intent scoring of one ticket (all its candidate labels)
    generate_s_per_reply: float  # one reply, generated in a full batch


@dataclass(frozen=True)
class Workload:
    """What the run has to do: token counts per train row and task, val rows, held-out work."""
    intent_tokens: tuple[int, ...]   # per train row: its intent sequences' tokens (noisy copies included)
    reply_tokens: tuple[int, ...]    # per train row: its reply sequence's tokens (0: no reply task)
    intents: tuple[str, ...]         # per train row
    intent_epochs: int
    reply_epochs: int
    val_rows: int
    heldout_queries: int             # calibration tickets scored (held-out rows and their copies)
    heldout_replies: int             # held-out rows the reply policy generates for
    score_val_rows: bool = True      # prediction scores labels (not when the ensemble gives the LM no weight)


@dataclass(frozen=True)
class TrainingPlan:
    rows: tuple[int, ...]       # train rows the adapters train on, in input order
    intent_epochs: int
    reply_epochs: int
    train_s: float              # what this plan's training is expected to take
    reserve_s: float            # kept for the mandatory prediction work
    generate_s: float           # what generating every held-out and val reply would take
    reason: str                 # one line: why nothing, or what, was cut
    costs: Costs | None = None  # what the plan was computed from (None: no deadline, nothing measured)

    @property
    def trains(self) -> bool:
        return bool(self.rows) and (self.intent_epochs > 0 or self.reply_epochs > 0)

    def to_dict(self) -> dict:
        """For tickettune.json: the row count rather than the rows, seconds rounded, costs as measured."""
        out = {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items() if k != "costs"}
        out["rows"] = len(self.rows)
        out["costs"] = None if self.costs is None else {k: float(f"{v:.4g}") for k, v in asdict(self.costs).items()}
        return out


def epoch_seconds(work: Workload, costs: Costs, rows: list[int] | tuple[int, ...]) -> tuple[float, float]:
    """Seconds of one intent epoch and one reply epoch over `rows`."""
    return (costs.intent_s_per_token * sum(work.intent_tokens[i] for i in rows),
            costs.reply_s_per_token * sum(work.reply_tokens[i] for i in rows))


def plan_training(work: Workload, costs: Costs, seconds_left: float, vectors: np.ndarray,
                  exclude: set[int] = frozenset(), measured: bool = True) -> TrainingPlan:
    """The plan for `seconds_left` (see the module docstring). `vectors`: (N, D) L2-normalised
    embeddings of the train tickets, for curation; `exclude`: rows never trained on (held out).
    `measured=False` (no deadline): everything, with no costs recorded.

    >>> w = Workload((10, 10, 10, 10), (30, 30, 30, 30), ("a", "a", "b", "b"), 2, 2, 10, 4, 2)
    >>> c = Costs(1.0, 1.0, 1.0, 1.0)     # 1 s per token: one epoch of all rows costs 40 + 120 s
    >>> plan_training(w, c, 10_000, np.eye(4)).reason
    'everything fits'
    >>> p = plan_training(w, c, 300, np.eye(4))
    >>> (len(p.rows), p.intent_epochs, p.reply_epochs)
    (4, 1, 1)
    >>> p = plan_training(w, c, 150, np.eye(4))
    >>> (p.rows, p.intent_epochs, p.reply_epochs)
    ((0, 2), 1, 1)
    >>> plan_training(w, c, 20, np.eye(4)).trains
    False
    """
    everyone = tuple(i for i in range(len(work.intents)) if i not in exclude)
    intent_1, reply_1 = epoch_seconds(work, costs, everyone)
    full = intent_1 * work.intent_epochs + reply_1 * work.reply_epochs
    reserve = (work.val_rows * work.score_val_rows + work.heldout_queries) * costs.score_s_per_ticket
    generate = (work.val_rows + work.heldout_replies) * costs.generate_s_per_reply
    usable = SAFETY * seconds_left
    done = dict(reserve_s=reserve, generate_s=generate, costs=costs if measured else None)
    if not measured or full + reserve + generate <= usable:
        return TrainingPlan(everyone, work.intent_epochs, work.reply_epochs, full, reason="everything fits", **done)
    share = max(0.0, min(full, max(usable - reserve - generate, MIN_TRAIN_SHARE * (usable - reserve))))
    why = (f"{usable:.0f} s usable: {reserve:.0f} s kept for label scoring, generating the held-out and val "
           f"replies would take {generate:.0f} s; training gets {share:.0f} s of the {full:.0f} s it wants")
    if not work.intent_epochs and not work.reply_epochs:
        return TrainingPlan(everyone, 0, 0, 0.0, reason="nothing to train", **done)
    # fewer epochs first, the same number for both adapters' share of time
    if full <= share:
        return TrainingPlan(everyone, work.intent_epochs, work.reply_epochs, full,
                            reason=f"{why}: training is not cut, generation may be", **done)
    for epochs in range(max(work.intent_epochs, work.reply_epochs), 0, -1):
        e_i, e_r = min(epochs, work.intent_epochs), min(epochs, work.reply_epochs)
        if intent_1 * e_i + reply_1 * e_r <= share:
            return TrainingPlan(everyone, e_i, e_r, intent_1 * e_i + reply_1 * e_r,
                                reason=f"{why}: {e_i}+{e_r} epochs instead of {work.intent_epochs}+{work.reply_epochs}",
                                **done)
    e_i, e_r = min(1, work.intent_epochs), min(1, work.reply_epochs)
    per_row = (intent_1 * e_i + reply_1 * e_r) / max(1, len(everyone))
    n = int(share // per_row) if per_row > 0 else len(everyone)
    if n < 1:
        return TrainingPlan((), 0, 0, 0.0, reason=f"{why}: not even one row fits, nothing trains", **done)
    rows = curate([work.intents[i] for i in everyone], vectors[list(everyone)], n)
    rows = tuple(everyone[i] for i in rows)
    intent_s, reply_s = epoch_seconds(work, costs, rows)
    return TrainingPlan(rows, e_i, e_r, intent_s * e_i + reply_s * e_r, reason=f"{why}: 1 epoch on {len(rows)} of {len(everyone)} rows "
                        "(a representative, diverse subset per intent)", **done)


def curate(intents: list[str], vectors: np.ndarray, n: int) -> tuple[int, ...]:
    """`n` rows, spread evenly over the intents (round robin, an intent's turn skipped when it has no
    rows left), each intent's rows in this order: the one nearest its centroid (representative),
    then each time the one farthest from those already taken (diverse). Deterministic; in input order.

    >>> v = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.6, 0.8], [1, 0]], dtype=float)
    >>> curate(["a", "a", "a", "a", "b"], v / np.linalg.norm(v, axis=1, keepdims=True), 3)
    (0, 3, 4)
    """
    order: dict[str, list[int]] = {}
    for intent in sorted(set(intents)):
        rows = [i for i, it in enumerate(intents) if it == intent]
        centroid = vectors[rows].mean(0)
        taken = [rows[int(np.argmax(vectors[rows] @ centroid))]]
        while len(taken) < len(rows):
            rest = [i for i in rows if i not in taken]
            nearest = (vectors[rest] @ vectors[taken].T).max(1)      # each left row's similarity to the taken
            taken.append(rest[int(np.argmin(nearest))])
        order[intent] = taken
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(intents)):
        for intent in sorted(order):
            if depth < len(order[intent]) and len(picked) < n:
                picked.append(order[intent][depth])
        depth += 1
    return tuple(sorted(picked))
