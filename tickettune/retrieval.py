"""Nearest training examples by sentence embedding: the embedding intent classifier and the
reference replies that ground generation.

Pure numpy over precomputed, L2-normalised embeddings (see `embeddings.embed`), so it tests in
milliseconds with hand-made vectors. Does not embed text itself and does not touch the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tickettune.data import Example

TEMPERATURES = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
DEFAULT_TEMPERATURE = 0.05


def class_scores(sims: np.ndarray, intent_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class score = cosine to the class's nearest example. sims: (Q, N) -> (Q, C); empty class -> -inf."""
    out = np.full((sims.shape[0], n_classes), -np.inf, dtype=np.float64)
    for c in range(n_classes):
        cols = intent_idx == c
        if cols.any():
            out[:, c] = sims[:, cols].max(axis=1)
    return out


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def fit_temperature(vectors: np.ndarray, intent_idx: np.ndarray, n_classes: int) -> float:
    """Softmax temperature minimising leave-one-out log-loss on train (rows whose class keeps
    another example). Falls back to DEFAULT_TEMPERATURE when no row qualifies."""
    counts = np.bincount(intent_idx, minlength=n_classes)
    rows = np.flatnonzero(counts[intent_idx] >= 2)
    if len(rows) == 0 or n_classes < 2:
        return DEFAULT_TEMPERATURE
    sims = vectors[rows] @ vectors.T                     # (R, N)
    sims[np.arange(len(rows)), rows] = -np.inf           # leave the row itself out
    scores = class_scores(sims, intent_idx, n_classes)   # (R, C)
    gold = intent_idx[rows]
    losses = [-log_softmax(scores / t)[np.arange(len(rows)), gold].mean() for t in TEMPERATURES]
    return TEMPERATURES[int(np.argmin(losses))]


@dataclass(frozen=True)
class RetrievalIndex:
    examples: tuple[Example, ...]
    vectors: np.ndarray        # (N, D), L2-normalised
    labels: tuple[str, ...]    # the taxonomy, sorted
    intent_idx: np.ndarray     # (N,) index into labels
    temperature: float

    @classmethod
    def fit(cls, examples: list[Example], vectors: np.ndarray) -> "RetrievalIndex":
        labels = tuple(sorted({e.intent for e in examples}))
        idx = np.array([labels.index(e.intent) for e in examples], dtype=np.int64)
        return cls(tuple(examples), vectors, labels, idx, fit_temperature(vectors, idx, len(labels)))

    def intent_logprobs(self, queries: np.ndarray) -> np.ndarray:
        """Calibrated log P(intent | ticket) from embeddings. (Q, D) -> (Q, C)."""
        scores = class_scores(queries @ self.vectors.T, self.intent_idx, len(self.labels))
        return log_softmax(scores / self.temperature)

    def nearest(self, query: np.ndarray, intent: str | None = None, k: int = 1,
                exclude: int | None = None) -> list[int]:
        """Indices of the k train rows most similar to `query` (optionally of one intent only)."""
        sims = self.vectors @ query
        order = np.argsort(-sims, kind="stable")
        keep = [int(i) for i in order
                if i != exclude and (intent is None or self.examples[i].intent == intent)]
        return keep[:k]
