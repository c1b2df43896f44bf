"""Coordinate-wise robust rules: median and trimmed mean.

Each coordinate is aggregated on its own, so f arbitrary outliers out of n > 2f can
move a coordinate only within the range of the honest values there. Claimed sample
counts are ignored: they come from the same untrusted peers as the models.
"""

from __future__ import annotations

import math

import numpy as np

from p2pfl.aggregation import sortnet

# Trim used by `trimmed_mean` when neither beta nor f is given: 10% per side, at least
# one input per side once there are three; "trimmed mean" that trims nothing would be
# a silent mean.
DEFAULT_BETA = 0.1


def median(x: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (even n: mean of the two middle values)."""
    return sortnet.median(x)


def trim_count(n: int, *, f: int, beta: float | None) -> int:
    """Inputs dropped from each side for n inputs.

    An explicit beta trims floor(beta * n) per side but at least one (beta > 0); else
    the declared attacker count f; else DEFAULT_BETA (at least one when n >= 3).
    """
    if beta is not None:
        return 0 if beta == 0 else max(1, math.floor(beta * n + 1e-9))
    if f > 0:
        return f
    return max(1, math.floor(DEFAULT_BETA * n + 1e-9)) if n >= 3 else 0


def trimmed_mean(x: np.ndarray, b: int) -> np.ndarray:
    """Per coordinate, the mean of what is left after dropping the b lowest and b highest."""
    n = x.shape[0]
    total = sortnet.trimmed_sum(x, b)
    total /= n - 2 * b
    return total.astype(np.float32)
