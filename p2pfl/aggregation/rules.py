"""The aggregation callable type and the plain sample-weighted mean (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (stacked inputs (n, d) float32 C-contiguous, weights (n,) float64 sample counts,
#  own model (d,)) -> aggregate (d,) float32. The node's own model is one of the rows.
_BLOCK = 16384

AggregationRule = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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
