"""The aggregation callable type and the plain sample-weighted mean (pure numpy)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import numpy as np

# (stacked inputs (n, d) float32 C-contiguous, weights (n,) float64 sample counts,
#  own model (d,)) -> aggregate (d,) float32. The node's own model is one of the rows.
_BLOCK = 16384  # columns per float64 block of the overflow path

AggregationRule = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# A claimed sample count is only a peer's word: it buys at most this many times the
# weight of the median claim, so one peer cannot take over a weighted mean by claiming
# 2**31 samples, while honest nodes with a few times more data still count for more.
MAX_WEIGHT_RATIO = 4.0


def bounded_weights(weights: np.ndarray) -> np.ndarray:
    """Claimed sample counts made safe to weight by: finite, >= 0, and each at most
    MAX_WEIGHT_RATIO times the median claim (our own count is one of the claims)."""
    w = np.array(weights, dtype=np.float64)  # a copy: the caller's array stays as it was
    bad = ~np.isfinite(w)
    if bad.any():
        w[bad] = 0.0
    np.maximum(w, 0.0, out=w)
    # n is a neighbourhood (tens): the list median costs microseconds, np.median tens.
    median = statistics.median(w.tolist()) if w.size else 0.0
    if median > 0:
        np.minimum(w, MAX_WEIGHT_RATIO * median, out=w)
    return w


def mean(updates: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Sample-weighted average (FedAvg). Falls back to uniform weights if all are zero.

    One pass over the (n, d) stack, the memory-bandwidth bound (about one `np.sum`
    pass in benchmarks/bench_aggregation.py, where a float64 accumulation cost five):
    numpy's own sum-of-products loop (`einsum`), not BLAS, whose worker threads stall
    when a busy device has fewer free cores than threads (measured: 50x slower than
    `np.sum` under load). The weights are normalised in float64 first, so each
    coordinate is a convex combination of n float32 terms, a few ulps from float64
    (the benchmark reports the error). Rows arrive in one canonical order (by peer id,
    `protocol.rounds`) and the loop's order is fixed, so nodes with the same inputs
    get the same bits. A float32 overflow (only at the edge of the float32 range) is
    redone blockwise in float64.
    """
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        w = np.ones(len(updates), dtype=np.float64)
        total = float(len(updates))
    w = w / total
    with np.errstate(over="ignore"):  # an overflow is caught below
        out = np.asarray(np.einsum("i,ij->j", w.astype(np.float32), updates), dtype=np.float32)
    # One read of the output (a float64 sum of float32 terms cannot overflow): finite
    # unless some coordinate overflowed (or an input was not finite, which the round
    # machine rejects before any rule runs).
    if math.isfinite(float(out.sum(dtype=np.float64))) or not np.isfinite(updates).all():
        return out
    d = updates.shape[1]
    for s in range(0, d, _BLOCK):
        e = min(d, s + _BLOCK)
        out[s:e] = w @ updates[:, s:e].astype(np.float64)
    return out
