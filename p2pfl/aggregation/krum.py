"""Krum and Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018).

Each input is scored by the summed squared distance to its n - f - 2 nearest other
inputs; Krum returns the best-scored input itself, Multi-Krum the plain average of the
m best. The guarantee needs n > 2f + 2 (the registry falls back below that). All
pairwise distances come from one Gram matrix, so this reads the stack once.
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation import gram


def min_inputs(f: int) -> int:
    return 2 * f + 3


def scores(x: np.ndarray, own: np.ndarray, f: int) -> np.ndarray:
    """Krum score of every input (lower is more central). Needs n >= f + 3."""
    n = x.shape[0]
    k = n - f - 2
    d2 = gram.pairwise_sq_dist(gram.centered_gram(x, own))
    np.fill_diagonal(d2, np.inf)  # an input is not its own neighbour
    nearest = np.partition(d2, k - 1, axis=1)[:, :k]
    out: np.ndarray = nearest.sum(axis=1)
    return out


def excluded(sc: np.ndarray, f: int) -> np.ndarray:
    """The f worst-scored inputs, as a bool mask: those Multi-Krum with m = n - f leaves
    out. (Krum adopts one input; "not the chosen one" would flag every honest input.)"""
    n = len(sc)
    out = np.zeros(n, dtype=bool)
    if f > 0:
        out[np.argsort(sc, kind="stable")[max(0, n - f) :]] = True
    return out


def krum(
    x: np.ndarray, own: np.ndarray, f: int, *, excluded_out: np.ndarray | None = None
) -> np.ndarray:
    """The input with the lowest score (ties: the first, i.e. the lowest peer id).
    `excluded_out` (bool (n,)), if given, receives `excluded(scores, f)`."""
    sc = scores(x, own, f)
    if excluded_out is not None:
        excluded_out[:] = excluded(sc, f)
    return np.array(x[int(np.argmin(sc))])


def multi_krum(
    x: np.ndarray, own: np.ndarray, f: int, m: int, *, excluded_out: np.ndarray | None = None
) -> np.ndarray:
    """Unweighted mean of the m lowest-scored inputs (m is clamped to n).
    `excluded_out` (bool (n,)), if given, receives `excluded(scores, f)`."""
    n = x.shape[0]
    sc = scores(x, own, f)
    if excluded_out is not None:
        excluded_out[:] = excluded(sc, f)
    chosen = np.argsort(sc, kind="stable")[: min(m, n)]
    beta = np.zeros(n, dtype=np.float64)
    beta[chosen] = 1.0 / len(chosen)
    return gram.combine(x, own, beta)
