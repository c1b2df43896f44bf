"""Nearest-neighbour mixing (Allouah et al., "Fixing by Mixing", AISTATS 2023).

Why: with heterogeneous (non-IID) data the honest inputs are far apart, and a robust
rule either mistakes that spread for an attack (and drops honest information) or lets
an attacker hide inside it. NNM replaces every input by the average of its n - f
nearest inputs (itself included) before the rule runs. An honest input's mixture
holds at most f attackers' inputs out of n - f, and the honest mixtures are pulled
together, so the spread the rule sees shrinks by about the factor the paper proves
(the rule's error then scales with f/n rather than with the rule's own constant).
Unlike bucketing it costs no Byzantine tolerance: the rule keeps f on n inputs.

Vectorised: distances from one Gram matrix (`gram`), the n - f nearest of every row by
one `argpartition`, and the mixtures as one (n, n) @ (n, d) product.
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation import gram


def mixing_matrix(x: np.ndarray, own: np.ndarray, f: int) -> np.ndarray:
    """(n, n) row-stochastic: row i puts 1/(n - f) on the n - f inputs nearest x_i
    (itself first: its distance is 0). The identity when f = 0 or f >= n."""
    n = x.shape[0]
    keep = n - f
    if f == 0 or keep <= 0:
        return np.eye(n)
    d2 = gram.pairwise_sq_dist(gram.centered_gram(x, own))
    # Self at distance exactly 0 must win ties with duplicates of itself.
    d2[np.diag_indices(n)] = -1.0
    nearest = np.argpartition(d2, keep - 1, axis=1)[:, :keep]
    a = np.zeros((n, n), dtype=np.float64)
    np.put_along_axis(a, nearest, 1.0 / keep, axis=1)
    return a


def mix(x: np.ndarray, own: np.ndarray, f: int) -> np.ndarray:
    """Every input replaced by the mean of its n - f nearest inputs, float32 (n, d)."""
    a = mixing_matrix(x, own, f)
    # Convex rows of float32 inputs: a float32 product cannot overflow beyond rounding
    # at the very edge of the range; redo in float64 then.
    out = np.asarray(a.astype(np.float32) @ x, dtype=np.float32)
    if not np.isfinite(out).all():
        out = (a @ x.astype(np.float64)).astype(np.float32)
    return out
