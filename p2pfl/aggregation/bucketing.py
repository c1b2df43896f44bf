"""Bucketing (Karimireddy, He, Jaggi 2022): average random groups of s inputs first.

Non-IID honest inputs are far apart, and robust rules mistake that spread for an
attack (or an attacker hides inside it). Averaging random buckets of s inputs shrinks
the honest spread by about sqrt(s) while f attackers still spoil at most f buckets, so
the inner rule sees fewer, tighter inputs at the cost of tolerating a fraction of
attackers s times smaller. The permutation comes from a seeded generator owned by the
rule, so a run is reproducible.
"""

from __future__ import annotations

import numpy as np


def bucket_means(
    x: np.ndarray, weights: np.ndarray, s: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(ceil(n/s), d) float32 bucket means and the summed weights of each bucket.

    Buckets are consecutive runs of `rng.permutation(n)`; the last may be smaller.
    Sums are in float64 so buckets of huge (finite) values cannot overflow.
    """
    n = x.shape[0]
    perm = rng.permutation(n)
    starts = np.arange(0, n, s)
    counts = np.diff(np.append(starts, n)).astype(np.float64)
    sums = np.add.reduceat(x[perm], starts, axis=0, dtype=np.float64)
    sums /= counts[:, None]
    bucket_weights = np.add.reduceat(np.asarray(weights, dtype=np.float64)[perm], starts)
    return np.ascontiguousarray(sums, dtype=np.float32), bucket_weights
