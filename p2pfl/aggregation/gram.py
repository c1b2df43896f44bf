"""Distances between inputs from one Gram matrix, and combinations of the inputs.

Krum, the geometric median and both clipping rules only ever need distances between
points that are weighted combinations of the inputs. Centred at the node's own model
(y_i = x_i - own), every such point is `own + beta @ Y` for a coefficient vector beta,
and ||y_i - beta @ Y||^2 = G_ii - 2 (G beta)_i + beta' G beta with G = Y Y'. So each
rule reads the (n, d) stack twice (once for G, once for the final combination) and
iterates in n-dimensional space in between, whatever its number of iterations.

G is accumulated in float64 over column blocks: the float32 stack is never copied
whole, and centring first avoids the cancellation of ||x||^2 - 2 x.y + ||y||^2 when
models are large and close together.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16384


def centered_gram(x: np.ndarray, own: np.ndarray) -> np.ndarray:
    """G = (x - own)(x - own)' in float64, shape (n, n)."""
    n, d = x.shape
    g = np.zeros((n, n), dtype=np.float64)
    buf = np.empty((n, min(BLOCK, d)), dtype=np.float64)
    for s in range(0, d, BLOCK):
        e = min(d, s + BLOCK)
        y = buf[:, : e - s]
        np.subtract(x[:, s:e], own[s:e], out=y, dtype=np.float64)
        g += y @ y.T
    return g


def sq_dist_to_point(g: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """||y_i - beta @ Y||^2 for every i (clamped at 0 against rounding)."""
    gb = g @ beta
    d2 = np.diag(g) - 2.0 * gb + float(beta @ gb)
    return np.asarray(np.maximum(d2, 0.0))


def pairwise_sq_dist(g: np.ndarray) -> np.ndarray:
    """||y_i - y_j||^2 for all pairs, from the Gram matrix (exact zeros on the diagonal)."""
    diag = np.diag(g)
    d2 = diag[:, None] + diag[None, :] - 2.0 * g
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def combine(x: np.ndarray, own: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """own + beta @ (x - own) = (1 - sum(beta)) own + beta @ x, as float32 (d,).

    The coefficients are non-negative with sum <= 1 (a convex combination of own and
    the inputs), so one float32 matrix-vector product is accurate and cannot overflow
    except by rounding at the very edge of the float32 range; that case is redone
    blockwise in float64.
    """
    rest = 1.0 - float(beta.sum())
    out = np.asarray(beta.astype(np.float32) @ x, dtype=np.float32)
    if rest != 0.0:
        out += np.float32(rest) * own
    if np.isfinite(out).all():
        return out
    d = x.shape[1]
    for s in range(0, d, BLOCK):
        e = min(d, s + BLOCK)
        block = beta @ x[:, s:e].astype(np.float64)
        block += rest * own[s:e].astype(np.float64)
        out[s:e] = block
    return out
