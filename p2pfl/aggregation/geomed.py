"""Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022).

The geometric median minimises the sum of Euclidean distances to the inputs; it has
breakdown point 1/2 and, unlike the coordinate-wise median, is rotation invariant.
Weiszfeld's iteration re-weights the inputs by 1 / max(eps, distance); every iterate
is a convex combination of the inputs, so we iterate on the n coefficients with
distances from the Gram matrix and touch the (n, d) stack only twice, however many
iterations run. Inputs are weighted uniformly (sample counts are untrusted).

Start point: RFA starts at the mean, but with a bounded number of iterations a far
outlier (1e30) then still drags the result by orders of magnitude after 10 steps:
each step only shrinks its pull geometrically. We start instead at the mean of the
majority (n // 2 + 1) of inputs nearest the medoid (the input with the least summed
distance to the others); with an honest majority and far outliers that start is
already honest, and Weiszfeld only refines it.
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation import gram

DEFAULT_ITERATIONS = 10
DEFAULT_EPS = 1e-6
# Stop early once an iteration improves the objective by less than this fraction.
REL_TOL = 1e-6


def coefficients(g: np.ndarray, *, iterations: int, eps: float) -> np.ndarray:
    """Weiszfeld coefficients beta (sum 1) of the geometric median, from the Gram matrix."""
    beta = start_coefficients(g)
    dist = np.sqrt(gram.sq_dist_to_point(g, beta))
    objective = float(dist.sum())
    for _ in range(iterations):
        alpha = 1.0 / np.maximum(dist, eps)
        beta = alpha / alpha.sum()
        dist = np.sqrt(gram.sq_dist_to_point(g, beta))
        new_objective = float(dist.sum())
        if objective - new_objective <= REL_TOL * objective:
            break
        objective = new_objective
    return beta


def start_coefficients(g: np.ndarray) -> np.ndarray:
    """Uniform weights on the n // 2 + 1 inputs nearest the medoid (ties: lower index)."""
    n = g.shape[0]
    dist = np.sqrt(gram.pairwise_sq_dist(g))
    medoid = int(np.argmin(dist.sum(axis=1)))
    chosen = np.argsort(dist[medoid], kind="stable")[: n // 2 + 1]
    beta = np.zeros(n, dtype=np.float64)
    beta[chosen] = 1.0 / len(chosen)
    return beta


def geometric_median(
    x: np.ndarray,
    own: np.ndarray,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    eps: float = DEFAULT_EPS,
) -> np.ndarray:
    beta = coefficients(gram.centered_gram(x, own), iterations=iterations, eps=eps)
    return gram.combine(x, own, beta)
