"""`encoder.supcon_loss` (Khosla et al. 2020, the "L_out" form) against a case computed by hand.

For each anchor i that has at least one other row of its label (its positives P(i)):
    L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )
and the loss is the mean of L_i over those anchors. A row alone in its label is no anchor but is still a
negative in the others' denominators. The embeddings come in L2-normalised; the function does not normalise.
"""

import math

import numpy as np
import pytest
import torch

from tickettune.pipeline.encoder import supcon_loss


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


ANGLES = [0.0, 30.0, 100.0, 200.0]   # rows 0, 1: label 0; row 2: label 1 (alone); row 3: label 0
LABELS = [0, 0, 1, 0]


def by_hand(angles, labels, temperature):
    z = [unit(a) for a in angles]
    dot = lambda i, j: z[i][0] * z[j][0] + z[i][1] * z[j][1]   # noqa: E731
    per_anchor = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(dot(i, a) / temperature) for a in range(len(z)) if a != i)
        per_anchor.append(-sum(math.log(math.exp(dot(i, p) / temperature) / denom) for p in positives)
                          / len(positives))
    return sum(per_anchor) / len(per_anchor)


def loss_of(angles, labels, temperature):
    emb = torch.tensor([unit(a) for a in angles], dtype=torch.float64)
    return float(supcon_loss(emb, torch.tensor(labels), temperature).detach())


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_supcon_loss_equals_the_hand_computed_value(temperature):
    expected = by_hand(ANGLES, LABELS, temperature)
    assert loss_of(ANGLES, LABELS, temperature) == pytest.approx(expected, abs=1e-5)


def test_a_fixed_case_to_four_decimals():
    """The same formula written out once for T = 1 and three rows: 0 and 1 share a label, 2 is alone.
    cos(0, 90) = 0, cos(0, 180) = -1, cos(90, 180) = 0, so for both anchors
    L = -log(e^0 / (e^0 + e^-1)) for anchor 0 and -log(e^0 / (e^0 + e^0)) for anchor 1."""
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert loss_of([0.0, 90.0, 180.0], [0, 0, 1], 1.0) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(0.5032, abs=1e-4)


def test_the_loss_is_lower_when_rows_of_a_label_coincide():
    apart = loss_of([0.0, 90.0, 180.0, 270.0], [0, 0, 1, 1], 0.1)
    together = loss_of([0.0, 0.0, 180.0, 180.0], [0, 0, 1, 1], 0.1)
    assert together < apart
    assert together == pytest.approx(math.log(1 + 2 * math.exp(-20)), abs=1e-6)  # the one positive wins


def test_no_positives_gives_zero_with_a_gradient():
    emb = torch.tensor([unit(0.0), unit(90.0)], dtype=torch.float64, requires_grad=True)
    loss = supcon_loss(emb, torch.tensor([0, 1]), 0.1)
    assert float(loss.detach()) == 0.0
    loss.backward()   # the training loop calls backward on every batch
    assert emb.grad is not None and np.allclose(emb.grad.numpy(), 0.0)
