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
# Coordinates `trimmed_shares` looks at: a share within 0.09 (two standard errors at
# worst; the score averages it over rounds) for 27-63 us (measured: 5% of the trimmed
# mean itself for 8 inputs of 1e5 coordinates, under 2% from 16 inputs or 1e6
# coordinates). 1024 coordinates cost 0.12-0.74 ms, up to 22% of the rule.
SHARE_SAMPLE = 128


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


def trimmed_shares(x: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
    """Per input, the share of coordinates on which a trimmed mean with b per side drops it.

    An input is dropped at a coordinate when it lies strictly below the lowest kept
    value or strictly above the highest one; ties with the kept band count as kept, so
    identical inputs (a coordinate nobody's training moves) are never "trimmed". Models
    with more than SHARE_SAMPLE coordinates are judged on that many coordinates drawn
    from `rng` (an estimate; the model itself is computed on all of them elsewhere).
    """
    n, d = x.shape
    if b == 0:
        return np.zeros(n, dtype=np.float64)
    cols = x if d <= SHARE_SAMPLE else x[:, rng.integers(0, d, SHARE_SAMPLE)]
    # Few columns: sorting each one's n values (one row per column) beats a network.
    ordered = np.sort(cols.T, axis=1)
    dropped = np.less(cols, ordered[:, b])
    dropped |= np.greater(cols, ordered[:, n - 1 - b])
    return np.asarray(np.count_nonzero(dropped, axis=1) / cols.shape[1], dtype=np.float64)


def trimmed_flag_threshold(n: int, b: int) -> float:
    """A share above this flags an input as trimmed: halfway between the share an input
    among exchangeable honest ones expects (2b / n) and always (1)."""
    return (1.0 + 2.0 * b / n) / 2.0
