"""The aggregation callable type and the plain sample-weighted mean (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (stacked inputs (n, d) float32 C-contiguous, weights (n,) float64 sample counts,
#  own model (d,)) -> aggregate (d,) float32. The node's own model is one of the rows.
AggregationRule = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def mean(updates: np.ndarray, weights: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Sample-weighted average (FedAvg). Falls back to uniform weights if all are zero."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        w = np.ones(len(updates), dtype=np.float64)
        total = float(len(updates))
    w = w / total
    # Accumulate in float64 one input at a time: exact enough to be order-insensitive in
    # practice, and never materializes a float64 copy of the whole (n, d) stack.
    out = np.zeros(updates.shape[1], dtype=np.float64)
    for i in range(len(updates)):
        out += w[i] * updates[i]
    return out.astype(np.float32)
