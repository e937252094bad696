"""The budget plan: measured costs in, rows and epochs out (pure arithmetic, no model)."""

import numpy as np
import pytest

from tickettune.pipeline.budget import MIN_TRAIN_SHARE, SAFETY, Costs, Workload, curate, plan_training

ONE = Costs(1.0, 1.0, 1.0, 1.0)


def workload(rows=12, intents=3, val=10, epochs=(4, 3)):
    return Workload(intent_tokens=(10,) * rows, reply_tokens=(30,) * rows,
                    intents=tuple(f"i{r % intents}" for r in range(rows)), intent_epochs=epochs[0],
                    reply_epochs=epochs[1], val_rows=val, heldout_queries=6, heldout_replies=2)


def vectors(n, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, 8))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_everything_fits_when_there_is_time():
    plan = plan_training(workload(), ONE, 10_000, vectors(12))
    assert plan.rows == tuple(range(12)) and (plan.intent_epochs, plan.reply_epochs) == (4, 3)
    assert plan.reason == "everything fits" and plan.train_s == 12 * 10 * 4 + 12 * 30 * 3


def test_training_keeps_half_of_what_the_reserve_leaves_even_when_replies_would_want_it_all():
    w = workload(val=5000)                         # generating every reply: 5000 s, far beyond the budget
    plan = plan_training(w, ONE, 2000, vectors(12))
    reserve = (5000 + 6) * 1.0
    assert plan.reserve_s == reserve and plan.trains is False  # the reserve alone is over the budget
    w = workload(val=1000)                         # generating every reply (1000 s) would leave nothing
    plan = plan_training(w, ONE, 2000, vectors(12))
    share = MIN_TRAIN_SHARE * (SAFETY * 2000 - plan.reserve_s)
    assert plan.trains and plan.train_s <= share + 1e-9 and plan.train_s > 0.5 * share


def test_epochs_go_first_then_rows_and_held_rows_never_train():
    w = workload()
    full_epoch = 12 * 10 + 12 * 30
    fewer_epochs = plan_training(w, ONE, (2 * full_epoch + 18 + 10) / SAFETY + 1, vectors(12))
    assert fewer_epochs.rows == tuple(range(12)) and (fewer_epochs.intent_epochs, fewer_epochs.reply_epochs) == (2, 2)
    held = {0, 5}
    fewer_rows = plan_training(w, ONE, 300, vectors(12), exclude=held)
    assert (fewer_rows.intent_epochs, fewer_rows.reply_epochs) == (1, 1) and 0 < len(fewer_rows.rows) < 10
    assert not held & set(fewer_rows.rows)
    assert {w.intents[i] for i in fewer_rows.rows} == {"i0", "i1", "i2"}  # every intent keeps a row
    assert "representative, diverse subset" in fewer_rows.reason


def test_nothing_trains_when_not_one_row_fits_and_the_plan_says_why():
    plan = plan_training(workload(), ONE, 30, vectors(12))
    assert not plan.trains and plan.rows == () and "nothing trains" in plan.reason


def test_curation_is_deterministic_balanced_and_starts_with_the_most_typical_row():
    intents = ["a"] * 6 + ["b"] * 2
    v = vectors(8, seed=3)
    picked = curate(intents, v, 4)
    assert picked == curate(intents, v, 4) and len(picked) == 4
    assert sum(i < 6 for i in picked) == 2 and sum(i >= 6 for i in picked) == 2  # round robin over intents
    a = list(range(6))
    typical = a[int(np.argmax(v[a] @ v[a].mean(0)))]
    assert typical in picked
    assert curate(intents, v, 100) == tuple(range(8))


@pytest.mark.parametrize("costs", [Costs(1e-3, 2e-3, 0.2, 1.5), Costs(0.0, 0.0, 0.0, 0.0)])
def test_the_plan_serialises_for_tickettune_json(costs):
    import json

    d = plan_training(workload(), costs, 100, vectors(12)).to_dict()
    json.dumps(d)
    assert d["rows"] <= 12 and set(d["costs"]) == {"intent_s_per_token", "reply_s_per_token",
                                                   "score_s_per_ticket", "generate_s_per_reply"}
