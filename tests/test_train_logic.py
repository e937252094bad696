import random

import pytest

from tickettune.pipeline.augment import noisy_copies
from tickettune.pipeline.data import Example
from tickettune.pipeline.train import Sequence, batches, holdout_rows


def examples(counts):
    rows = []
    for intent, n in counts.items():
        rows += [Example(f"{intent}{i}", "t", intent, "r") for i in range(n)]
    return rows


def test_holdout_keeps_a_row_of_every_intent_and_is_seeded():
    rows = examples({"a": 3, "b": 2, "c": 1, "d": 3, "e": 2})
    held = holdout_rows(rows, 0.2, seed=0)
    assert len(held) == 2
    kept = {rows[i].intent for i in range(len(rows)) if i not in held}
    assert kept == {"a", "b", "c", "d", "e"}
    assert held == holdout_rows(rows, 0.2, seed=0)


@pytest.mark.parametrize("counts, frac", [({"a": 2, "b": 2}, 0.2), ({"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, 0.5),
                                          ({"a": 9}, 0.0)])
def test_no_holdout_when_too_few_rows_or_singletons(counts, frac):
    assert holdout_rows(examples(counts), frac, seed=0) == set()


def test_batches_cover_every_sequence_once_and_are_deterministic():
    seqs = [Sequence([1] * n, [1] * n, i) for i, n in enumerate([5, 50, 7, 30, 9, 11, 2, 40, 3])]
    a = batches(seqs, 2, random.Random(1))
    assert sorted(s.row for b in a for s in b) == list(range(9))
    assert [[s.row for s in b] for b in a] == [[s.row for s in b] for b in batches(seqs, 2, random.Random(1))]


def test_token_cap_splits_long_rows_but_keeps_every_sequence():
    seqs = [Sequence([1] * n, [1] * n, i) for i, n in enumerate([300, 290, 310, 20, 25, 30, 22, 305])]
    out = batches(seqs, 8, random.Random(0), max_tokens=700)
    assert sorted(s.row for b in out for s in b) == list(range(8))
    assert all(len(b) * max(len(s.input_ids) for s in b) <= 700 for b in out)
    assert max(len(b) for b in out) == 4  # the four short rows still share a batch


def test_noisy_copies_differ_from_the_original_and_repeat_with_the_seed():
    text = "Hello, how do I add two more seats to our Team plan?"
    copies = noisy_copies(text, 6, random.Random(0))
    assert len(copies) == 6 and text not in copies
    assert copies == noisy_copies(text, 6, random.Random(0))

