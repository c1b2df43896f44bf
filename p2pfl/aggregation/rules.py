"""Aggregation rules (pure numpy)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (stacked updates (n, d) float32, weights (n,) >= 0, own model (d,)) -> aggregate (d,)
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


RULES: dict[str, AggregationRule] = {"mean": mean}


def get_rule(name: str) -> AggregationRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown aggregation rule {name!r}; available: {sorted(RULES)}") from None
