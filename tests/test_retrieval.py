import numpy as np
import pytest

from tickettune.pipeline.data import Example
from tickettune.pipeline.retrieval import DEFAULT_TEMPERATURE, RetrievalIndex, fit_temperature, log_softmax, prototypes


def unit(*v):
    v = np.array(v, dtype=np.float32)
    return v / np.linalg.norm(v)


EXAMPLES = [Example(f"e{i}", f"t{i}", intent, f"r{i}") for i, intent in enumerate(["b", "a", "a", "b"])]
TICKETS = np.stack([unit(0, 1, 0.1), unit(1, 0, 0), unit(1, 0.2, 0), unit(0.1, 1, 0)])
REPLIES = np.stack([unit(0, 1, 0), unit(1, 0, 0.1), unit(1, 0, 0), unit(0, 1, 0)])


def test_prototypes_average_tickets_and_replies_per_class():
    protos = prototypes(TICKETS, REPLIES, np.array([1, 0, 0, 1]), 2)
    assert protos.shape == (2, 3) and np.allclose(np.linalg.norm(protos, axis=1), 1.0)
    expected = TICKETS[1] + TICKETS[2] + REPLIES[1] + REPLIES[2]
    assert np.allclose(protos[0], expected / np.linalg.norm(expected))


def test_intent_logprobs_are_normalised_and_pick_the_near_class():
    index = RetrievalIndex.fit(EXAMPLES, TICKETS, REPLIES)
    assert index.labels == ("a", "b")
    logp = index.intent_logprobs(np.stack([unit(1, 0.1, 0), unit(0, 1, 0)]))
    assert np.allclose(np.exp(logp).sum(1), 1.0)
    assert list(logp.argmax(1)) == [0, 1]


def test_temperature_is_fit_by_leave_one_out_and_prefers_sharp_when_separable():
    idx = np.array([1, 0, 0, 1])
    assert fit_temperature(TICKETS, REPLIES, idx, 2) == 0.01  # perfectly separable: sharpest wins
    assert fit_temperature(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), np.array([0, 1, 2]), 3) \
        == DEFAULT_TEMPERATURE  # no class has two rows


def test_nearest_filters_by_intent_and_excludes_self():
    index = RetrievalIndex.fit(EXAMPLES, TICKETS, REPLIES)
    assert index.nearest(TICKETS[1], k=2) == [1, 2]
    assert index.nearest(TICKETS[1], intent="a", k=3, exclude=1) == [2]
    assert index.nearest(TICKETS[1], intent="b", k=1) == [3]


def test_single_intent_gives_probability_one():
    index = RetrievalIndex.fit(EXAMPLES[1:3], TICKETS[1:3], REPLIES[1:3])
    assert np.allclose(index.intent_logprobs(TICKETS[:1]), 0.0)


@pytest.mark.parametrize("x", [np.array([[0.0, -np.inf]]), np.array([[1.0, 2.0, 3.0]])])
def test_log_softmax_handles_minus_infinity(x):
    out = log_softmax(x)
    assert np.isfinite(out[0, 0]) and np.isclose(np.exp(out).sum(), 1.0)


def test_the_linear_head_separates_what_the_prototypes_blur():
    """Two intents that differ in one small dimension, while a large shared one varies within each:
    the prototypes' cosine follows the large dimension, the linear head the one that separates."""
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(40):
        label = i % 2
        big = rng.uniform(-1, 1)
        rows.append(unit(big, 0.15 if label else -0.15, 1.0))
        labels.append("ab"[label])
    examples = [Example(f"e{i}", f"t{i}", lab, "") for i, lab in enumerate(labels)]
    vectors = np.stack(rows)
    index = RetrievalIndex.fit(examples, vectors, np.zeros_like(vectors))
    queries = np.stack([unit(0.9, -0.15, 1.0), unit(-0.9, 0.15, 1.0), unit(0.9, 0.15, 1.0), unit(-0.9, -0.15, 1.0)])
    logp = index.linear_logprobs(queries)
    assert logp.shape == (4, 2) and np.allclose(np.exp(logp).sum(1), 1.0)
    assert logp.argmax(1).tolist() == [0, 1, 1, 0]
    assert index.without({0, 1}).linear_head[0].shape == (2, 3)   # refitted on the rows it keeps


def test_the_linear_head_with_one_intent_is_certain():
    index = RetrievalIndex.fit(EXAMPLES[1:3], TICKETS[1:3], REPLIES[1:3])
    assert np.allclose(index.linear_logprobs(TICKETS[:2]), 0.0)


def test_an_intents_name_is_a_row_of_the_linear_head_and_survives_refitting():
    """One ticket per intent cannot place a paraphrase that is far from both; the intent's name,
    embedded, is one more row that can ("card arrival" for "where is my card?")."""
    examples = [Example("e0", "t0", "a", ""), Example("e1", "t1", "b", ""), Example("e2", "t2", "b", "")]
    vectors = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 1, 0.2)])
    names = {"a": unit(0, 0.2, 1), "b": unit(0, 1, 0.1)}
    query = np.stack([unit(0, 0.3, 1)])
    plain = RetrievalIndex.fit(examples, vectors, np.zeros_like(vectors))
    named = RetrievalIndex.fit(examples, vectors, np.zeros_like(vectors), names)
    assert plain.linear_logprobs(query).argmax(1).tolist() == [1]
    assert named.linear_logprobs(query).argmax(1).tolist() == [0]
    assert named.without({2}).names is names and named.without({2}).linear_logprobs(query).argmax(1).tolist() == [0]
    assert np.array_equal(named.protos, plain.protos)       # the prototypes stay the rows' own


def test_build_embeds_tickets_replies_and_intent_names_as_words():
    seen = []

    def embed(texts):
        seen.append(list(texts))
        return np.stack([unit(1 + len(t), 1, 0) for t in texts])

    examples = [Example("e0", "where is my card", "card_arrival", "It ships in 3 days."),
                Example("e1", "top up failed", "topUpFailed", "Try again.")]
    index = RetrievalIndex.build(examples, embed)
    assert ["card arrival", "top up failed"] in seen and sorted(index.names) == ["card_arrival", "topUpFailed"]
    assert RetrievalIndex.build(examples, embed, label_names=False).names is None
