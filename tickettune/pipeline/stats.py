"""The statistics the run decides by: whether paired gains over a handful of held-out rows are beyond
chance. Pure numpy and scipy; no model. (The benches' intervals over desks are in bench/desks.py.)"""

from __future__ import annotations

import numpy as np


def significant_gain(gains: np.ndarray, level: float = 0.05) -> bool:
    """True when the paired `gains` are positive beyond chance: a one-sided t-test at `level`.
    Fewer than two gains prove nothing; gains that are all equal and positive are a win.

    >>> significant_gain(np.array([0.2, 0.1, 0.2])), significant_gain(np.array([0.3, -0.1, 0.0]))
    (True, False)
    """
    from scipy.stats import ttest_1samp

    gains = np.asarray(gains, dtype=float)
    if len(gains) < 2 or gains.mean() <= 0:
        return False
    if np.all(gains == gains[0]):
        return True
    return bool(ttest_1samp(gains, 0.0, alternative="greater").pvalue < level)
