"""The ensemble's calibration and the intent encoder's share of the time: pure logic, milliseconds."""

import time
from types import SimpleNamespace

import numpy as np
import pytest

from tickettune.pipeline import budget
from tickettune.pipeline.config import RunConfig
from tickettune.pipeline.data import Example
from tickettune.pipeline.time_budget import encoder_deadline
from tickettune.pipeline.intent import choose_weights, ensemble_weights, heldout_queries


def _experts(n_rows: int, copies: int, lm_right: bool = True):
    """Prototypes unsure everywhere, an LM fairly sure and right (or wrong): n_rows held-out rows, each
    with `copies` identical noisy copies (the worst case for counting copies as evidence)."""
    per = 1 + copies
    gold = np.array([r % 2 for r in range(n_rows) for _ in range(per)])
    sure = np.array([0.9 if r % 2 == 0 else 0.55 for r in range(n_rows) for _ in range(per)])[:, None]
    proto = np.log(np.where(np.eye(2)[gold] == 1, 0.45, 0.55))
    lm = np.log(np.where(np.eye(2)[gold] == 1, sure if lm_right else 1 - sure, 1 - sure if lm_right else sure))
    return {"proto": proto, "lm": lm}, gold, np.repeat(np.arange(n_rows), per)


def test_the_lm_earns_its_weight_only_beyond_chance_over_rows_not_copies():
    experts, gold, rows = _experts(n_rows=2, copies=3)
    # per query (8 queries, all gaining) it looks significant; per row (2 rows) it is not
    assert ensemble_weights(experts, gold, np.arange(len(gold)), True)["lm"] > 0
    assert ensemble_weights(experts, gold, rows, True)["lm"] == 0.0
    experts, gold, rows = _experts(n_rows=6, copies=3)
    assert ensemble_weights(experts, gold, rows, True)["lm"] > 0


def test_a_wrong_lm_gets_no_weight():
    experts, gold, rows = _experts(n_rows=6, copies=1, lm_right=False)
    assert ensemble_weights(experts, gold, rows, True) == {"proto": 1.0, "lm": 0.0}


def test_the_heldout_rows_never_move_the_embedding_experts():
    """However clearly 12 held-out rows favour the encoder, the run keeps the embedding experts equal
    (moving them on such evidence lost on the desks not used to choose: bench/desks.py); the old rule,
    `choose_weights`, would have moved them."""
    gold = np.array([r % 2 for r in range(12)])
    right = np.eye(2)[gold] == 1
    experts = {"proto": np.log(np.where(right, 0.45, 0.55)), "encoder": np.log(np.where(right, 0.9, 0.1))}
    assert ensemble_weights(experts, gold, np.arange(12), True) == {"proto": 1.0, "encoder": 1.0}
    assert choose_weights(experts, gold, prior={"proto": 1.0, "encoder": 1.0}) != {"proto": 1.0, "encoder": 1.0}


def test_heldout_queries_name_each_querys_row():
    examples = [Example(str(i), f"ticket number {i} about the billing page", "a" if i % 2 else "b", "")
                for i in range(6)]
    texts, gold, rows = heldout_queries(examples, {1, 4}, copies=2, seed=0)
    assert len(texts) == len(gold) == len(rows) == 6
    assert rows.tolist() == [1, 1, 1, 4, 4, 4] and gold.tolist() == [0, 0, 0, 1, 1, 1]


def _model(n_rows: int, device: str = "cuda"):
    examples = tuple(Example(str(i), "t", f"i{i % 3}", "r") for i in range(n_rows))
    index = SimpleNamespace(examples=examples, vectors=np.eye(n_rows))
    seqs = [SimpleNamespace(row=i, task=task, input_ids=[0] * 50) for i in range(n_rows) for task in ("intent", "reply")]
    return SimpleNamespace(config=RunConfig.for_plan(device), index=index), seqs


@pytest.mark.parametrize("score_s, device, share", [(0.01, "cuda", "time_share"), (10.0, "cuda", "time_share_alone"),
                                                    (0.01, "cpu", "time_share_alone")])
def test_the_encoder_takes_the_time_the_adapters_cannot_use(score_s, device, share):
    """On the GPU plan the LM's intent adapter gets the larger share unless it could not train in it; on the
    CPU plan, where the LM's label scores never change an intent (weight fixed at 0), the encoder gets it."""
    model, seqs = _model(12, device)
    costs = budget.Costs(1e-3, 1e-3, score_s, 0.0)    # 10 s per val ticket scored: nothing else fits
    deadline = time.monotonic() + 300
    until = encoder_deadline(model, seqs, set(), val_rows=100, costs=costs, deadline=deadline)
    expected = getattr(model.config.encoder, share)
    assert until - time.monotonic() == pytest.approx(expected * 300, abs=2)
    assert encoder_deadline(model, seqs, set(), 100, costs, None) is None


def test_the_encoder_replaces_the_prototypes_only_on_evidence():
    def experts(n_rows: int):
        gold = np.array([r % 2 for r in range(n_rows)])
        right = np.eye(2)[gold] == 1
        sure = np.where(np.arange(n_rows) % 3 == 0, 0.6, 0.9)[:, None]   # right everywhere, surer mostly
        return {"proto": np.log(np.where(right, 0.55, 0.45)), "encoder": np.log(np.where(right, sure, 1 - sure))}, gold

    few, gold = experts(2)     # one row each way: no evidence, the prototypes stay alone
    assert choose_weights(few, gold) == {"proto": 1.0, "encoder": 0.0}
    many, gold = experts(12)
    weights = choose_weights(many, gold)
    assert weights["encoder"] > 0 and weights != {"proto": 1.0, "encoder": 0.0}


def test_without_evidence_the_prior_stands():
    experts, gold = {"proto": np.log([[0.45, 0.55], [0.55, 0.45]]), "encoder": np.log([[0.1, 0.9], [0.48, 0.52]])}, np.array([1, 0])
    equal = {"proto": 1.0, "encoder": 1.0}
    assert choose_weights(experts, gold, prior=equal) == equal          # two rows: the encoder's edge is chance
    assert choose_weights(experts, gold) == {"proto": 1.0, "encoder": 0.0}


def test_without_replies_the_prototypes_are_not_weighed_and_the_prior_is_the_encoder_and_the_linear_head():
    """An intent benchmark (no replies): prototypes of a few tickets are left out, and the encoder and the
    linear head keep equal weights unless the held-out rows argue beyond chance (here: one row each way)."""
    from tickettune.pipeline.intent import prior_weights, weighed_experts

    gold = np.array([1, 0])
    experts = {"logreg": np.log([[0.45, 0.55], [0.55, 0.45]]), "encoder": np.log([[0.1, 0.9], [0.52, 0.48]])}
    names = weighed_experts(replies_said=False, encoder=True)
    assert "proto" not in names and prior_weights(names, replies_said=False) == {"encoder": 1.0, "logreg": 1.0}
    assert choose_weights(experts, gold, prior=prior_weights(names, False)) == {"encoder": 1.0, "logreg": 1.0}
    with_replies = weighed_experts(replies_said=True, encoder=True)
    assert "proto" in with_replies and prior_weights(with_replies, True) == {"proto": 1.0, "logreg": 1.0, "encoder": 1.0}


@pytest.mark.parametrize("rows_per_intent", [1, 2])
def test_with_nothing_held_out_every_embedding_expert_counts_equally_and_the_lm_not_at_all(rows_per_intent):
    """With no held-out rows (here: too few rows to hold any out) the LM's worth is unknown: weight 0;
    the embedding experts count equally, as they do everywhere."""
    from tickettune.pipeline.calibration import calibrate

    examples = [Example(f"r{i}{j}", f"ticket {i} {j}", f"intent.{i}", f"reply {i}")
                for i in range(3) for j in range(rows_per_intent)]
    index = SimpleNamespace(examples=examples, labels=tuple(sorted({e.intent for e in examples})))
    model = SimpleNamespace(config=RunConfig.for_plan("cpu", {}), index=index)
    assert calibrate(model, held=set(), encoder=object(), lm_trained=True) == {"proto": 1.0, "logreg": 1.0, "encoder": 1.0, "lm": 0.0}


def test_label_scores_are_not_timed_where_the_lm_weight_is_fixed_at_zero():
    """The CPU plan fixes the LM's intent weight at 0: no label score can change an answer there."""
    from tickettune.pipeline.calibration import lm_scores_matter

    assert not lm_scores_matter(RunConfig.for_plan("cpu", {}))
    assert lm_scores_matter(RunConfig.for_plan("cuda", {}))
    assert lm_scores_matter(RunConfig.for_plan("cpu", {"infer": {"lm_weight": 0.5}}))
    assert lm_scores_matter(RunConfig.for_plan("cpu", {"infer": {"calibrate_lm_weight": True}}))
