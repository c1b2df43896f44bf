"""Bucketing (Karimireddy, He, Jaggi 2022): average random groups of s inputs first.

Non-IID honest inputs are far apart, and robust rules mistake that spread for an
attack (or an attacker hides inside it). Averaging random buckets of s inputs shrinks
the honest spread by about sqrt(s) while f attackers still spoil at most f buckets, so
the inner rule sees fewer, tighter inputs at the cost of tolerating a fraction of
attackers s times smaller. That cost is checked on every call: the buckets must be as
many as the inner rule needs inputs to outvote f, else the call uses smaller buckets
(`safe_bucket_size`; the registry reports it). The permutation comes from a seeded
generator owned by the rule, so a run is reproducible.
"""

from __future__ import annotations

import numpy as np


def bucket_means(
    x: np.ndarray, weights: np.ndarray, s: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(ceil(n/s), d) float32 bucket means and the summed weights of each bucket, the
    buckets being consecutive runs of `rng.permutation(n)` (the last may be smaller)."""
    return bucket_means_of(x, weights, s, rng.permutation(x.shape[0]))


def bucket_means_of(
    x: np.ndarray, weights: np.ndarray, s: int, perm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`bucket_means` for a given permutation: bucket k holds perm[k*s : (k+1)*s].

    Each input is scaled by 1/size before adding, so a bucket of huge (finite) values
    cannot overflow; the loop runs over buckets, each step a whole-row numpy call.
    """
    n, d = x.shape
    w = np.asarray(weights, dtype=np.float64)
    count = -(-n // s)
    means = np.empty((count, d), dtype=np.float32)
    bucket_weights = np.empty(count, dtype=np.float64)
    for k in range(count):
        members = perm[k * s : (k + 1) * s]
        scale = np.float32(1.0 / len(members))
        row = means[k]
        np.multiply(x[members[0]], scale, out=row)
        for i in members[1:]:
            row += x[i] * scale
        bucket_weights[k] = w[members].sum()
    return means, bucket_weights


def bucket_of(perm: np.ndarray, s: int) -> np.ndarray:
    """Index of the bucket each input landed in (inputs in their original order)."""
    out = np.empty(len(perm), dtype=np.intp)
    out[perm] = np.arange(len(perm)) // s
    return out


def safe_bucket_size(n: int, s: int, need: int) -> int:
    """The largest bucket size <= s giving at least `need` buckets of n inputs (1, i.e.
    no bucketing, when none does: then the inner rule sees as many inputs as exist).

    f attackers spoil at most f buckets whatever their size, so the inner rule needs as
    many buckets as it needs inputs to outvote f (`registry.min_inputs`)."""
    size = s
    while size > 1 and -(-n // size) < need:
        size -= 1
    return size
