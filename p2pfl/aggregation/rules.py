"""The aggregation callable type and the plain sample-weighted mean (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (stacked inputs (n, d) float32 C-contiguous, weights (n,) float64 sample counts,
#  own model (d,)) -> aggregate (d,) float32. The node's own model is one of the rows.
_BLOCK = 16384

AggregationRule = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# A claimed sample count is only a peer's word: it buys at most this many times the
# weight of the median claim, so one peer cannot take over a weighted mean by claiming
# 2**31 samples, while honest nodes with a few times more data still count for more.
MAX_WEIGHT_RATIO = 4.0


def bounded_weights(weights: np.ndarray) -> np.ndarray:
    """Claimed sample counts made safe to weight by: finite, >= 0, and each at most
    MAX_WEIGHT_RATIO times the median claim (our own count is one of the claims)."""
    w = np.nan_to_num(np.asarray(weights, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(w, 0.0, out=w)
    median = float(np.median(w)) if w.size else 0.0
    if median > 0:
        np.minimum(w, MAX_WEIGHT_RATIO * median, out=w)
    return w


def mean(updates: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Sample-weighted average (FedAvg). Falls back to uniform weights if all are zero."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        w = np.ones(len(updates), dtype=np.float64)
        total = float(len(updates))
    w = w / total
    # Accumulate in float64 one input at a time, over cache-sized column blocks with
    # reused buffers: exact enough to be order-insensitive in practice, never a float64
    # copy of the whole (n, d) stack, and the same element-wise operations in the same
    # order on every machine (nodes with the same inputs agree bit for bit).
    n, d = updates.shape
    out = np.empty(d, dtype=np.float32)
    acc = np.empty(min(d, _BLOCK), dtype=np.float64)
    tmp = np.empty_like(acc)
    for s in range(0, d, _BLOCK):
        m = min(d, s + _BLOCK) - s
        a, t = acc[:m], tmp[:m]
        a.fill(0.0)
        for i in range(n):
            np.multiply(updates[i, s : s + m], w[i], out=t)
            a += t
        out[s : s + m] = a
    return out
