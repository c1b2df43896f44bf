"""Centred clipping (Karimireddy et al. 2021), self-centred clipping and ClippedGossip
(He et al. 2022).

Both move from a centre v towards the inputs, but each input's pull is clipped to a
radius tau: v <- v + (1/n) sum_i clip(x_i - v, tau). An attacker then shifts the result
by at most tau / n, however far away it sends its model.

- `centered_clipping` starts at the node's own model (there is no server momentum to
  centre on in a decentralized round) and repeats the step `iterations` times, each
  time around the new centre.
- `self_centered_clipping` (ClippedGossip) does exactly one step around the node's own
  model: the neighbours' differences from *my* model are clipped and averaged, so an
  honest node is never dragged further than tau per round by anyone. This is the rule
  with guarantees on sparse decentralized graphs.

Adaptive radius (the default when no `tau` is given): the distance of the (f+1)-th
farthest input from the current centre, i.e. the f farthest inputs are clipped to the
radius of the farthest one that may be honest, and everything nearer passes
unchanged. With f = 0 nothing is clipped (the rule is the mean); with f >= n - 1 the
radius is 0 and the node keeps its own model. Weights are uniform 1/n, own included
(as in gossip averaging); claimed sample counts are ignored.

`clipped_gossip` is the same single step with the paper's own adaptive radius instead
(He, Karimireddy and Jaggi 2022, the practical rule of its experiments): with gossip
weights 1/n and a Byzantine weight delta = f/n, the radius is the one its analysis asks
for, tau^2 = (1/delta) * sum over the n - f inputs nearest to my model of (1/n) d_j^2,
i.e. tau = sqrt(sum of the n - f smallest d_j^2 / f). It bounds what the f clipped
inputs can add (f * tau / n) by the honest spread itself, rather than clipping exactly
the f farthest inputs as `adaptive_tau` does: when honest neighbours are close
together and near me nobody is clipped (the step is plain gossip averaging), and an
input far beyond the honest spread is cut down to it. With f = 0 the radius is
infinite (the mean). (From the paper's adaptive-radius formula with uniform weights;
the text was not at hand while implementing: re-check the constant against it. The
authors' code, epfml/byzantine-robust-decentralized-optimizer codes/aggregator.py,
uses as its adaptive radius the second largest neighbour distance, which is
`self_centered_clipping` with f = 1; the dumbbell its paper plots uses a fixed tau = 1.)

Far-outlier cut (`reject`, off unless given): clipping bounds an attacker's pull to
tau / n per step, but an attacker far outside the honest spread gets that pull every
round, always in the same direction (a scaled sign-flip, measured at 9x the median
distance on the 6-regular Dirichlet(0.3) grid, where honest neighbours stay within
1.8x it; docs/robustness.md). With
`reject = c`, those of the f farthest inputs whose distance from the node's own model
exceeds c times the (f+1)-th farthest distance (the adaptive radius: the farthest an
input can be and still be honest) are given no pull at all (clipped to radius 0)
instead of tau. It never removes more than f inputs, so the honest majority's
guarantees are those of clipping; an attacker that stays inside c times that radius is
clipped as before (the in-spread attacks: ALIE, IPM, mimic). Only the distance from my
own model is used, so it costs nothing beyond the distances clipping computes.

Radius floor (`spread = s`, off unless given; `centered_clipping` and
`self_centered_clipping`): the adaptive radius clips the f farthest inputs in every
call, honest or not. Under label skew, with no attacker, the f farthest are the honest
nodes that hold rare classes, and clipping them every round slows learning those
classes: on the 25-node Dirichlet(0.1) mesh with f = 5 that costs 1.1 points of clean
accuracy against the mean (0.8 more with the cut; docs/robustness.md). With `spread =
s` the radius is max(adaptive radius, s * m), m = `median_distance`, the lower median
of the n distances from the centre. With an honest majority m lies between two honest
distances whatever the attackers send, so the radius stays of the order of the honest
spread, which is what the clipping analyses ask of it (ClippedGossip's radius is the
honest spread over delta; Karimireddy, He and Jaggi 2021 likewise): one attacker
still moves a step by at most s * m / n, however far away it is. But an honest input
is now clipped only when it is far *relative to the spread* (more than s median
distances away), not merely because it is among the f farthest. Measured, the
farthest honest input is within 1.55 m in half of the aggregations and 1.9 m in 90%
(the mesh, clean; 1.35 m and 1.75 m on the 6-regular Dirichlet(0.3) grid), so s = 2
clips almost no honest input. With `reject = c` the cut is relative to the same raised
radius, c * max(adaptive radius, s * m): s = 2 and c = 1.5 cut at 3 median distances,
which on 7 inputs with f = 3 (where the adaptive radius is the median) is the cut of
`reject = 3` alone, and on the mesh catches a sign-flip x4 attacker (3.4 m in the
median aggregation). With 2f >= n the median may be an attacker's distance, and the
floor is not applied. `spread` <= 1 would change nothing (the (f+1)-th farthest of n
>= 2f + 1 inputs is never nearer than the median), hence must be > 1.

Iterates are combinations own + beta @ (x - own) with distances from the Gram matrix,
so the stack is read twice whatever the number of iterations.
"""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation import gram

DEFAULT_ITERATIONS = 3


def adaptive_tau(dist: np.ndarray, f: int) -> float:
    """Radius that clips exactly the f farthest inputs (ties clip together)."""
    n = len(dist)
    if f >= n:
        return 0.0
    k = n - 1 - f  # ascending index of the (f+1)-th largest
    return float(np.partition(dist, k)[k])


def median_distance(dist: np.ndarray) -> float:
    """The lower median of the n distances, the node's own input included (0 around
    its own model). With 2f < n it is at most the largest honest distance and at least
    the smallest, wherever the f attackers are: a breakdown-1/2 measure of the honest
    spread. (The median of the neighbours' distances alone can be an attacker's when
    f of the 2f neighbours are attackers; with own's 0 counted it cannot.)"""
    k = (len(dist) - 1) // 2
    return float(np.partition(dist, k)[k])


def spread_radius(dist: np.ndarray, f: int, spread: float | None) -> float:
    """The adaptive radius (`adaptive_tau`), raised to `spread` times the median
    distance when that is larger. Unchanged with `spread` None, with f = 0 (the mean)
    and without an honest majority (2f >= n: the median could be an attacker's)."""
    radius = adaptive_tau(dist, f)
    if spread is None or f <= 0 or 2 * f >= len(dist):
        return radius
    return max(radius, spread * median_distance(dist))


def far_outliers(
    dist: np.ndarray, f: int, reject: float | None, spread: float | None = None
) -> np.ndarray | None:
    """Which of the f farthest inputs lie beyond `reject` times the reference distance
    (bool (n,)), or None when nothing is cut. The reference is the clipping radius:
    the (f+1)-th farthest distance, `adaptive_tau` (the farthest an input can be and
    still be honest when at most f are not, whatever the f attackers send), or with
    `spread` that radius raised to `spread` median distances (`spread_radius`). (A
    median of the neighbours' distances alone would move with the attackers once they
    are close to half of the neighbours; `median_distance` counts own's 0.)"""
    if reject is None or f <= 0:
        return None
    n = len(dist)
    order = np.argsort(dist, kind="stable")
    farthest = order[max(0, n - f) :]
    cut = np.zeros(n, dtype=bool)
    cut[farthest] = dist[farthest] > reject * spread_radius(dist, f, spread)
    return cut if cut.any() else None


def _clip_factors(dist: np.ndarray, tau: float) -> np.ndarray:
    """min(1, tau / dist), with 1 for inputs already at the centre."""
    safe = np.where(dist > 0, dist, 1.0)
    return np.where(dist > tau, tau / safe, 1.0)


def centered_clipping_coefficients(
    g: np.ndarray,
    *,
    f: int,
    tau: float | None,
    iterations: int,
    reject: float | None = None,
    spread: float | None = None,
    clipped_out: np.ndarray | None = None,
) -> np.ndarray:
    """Coefficients of the result; `clipped_out` (bool (n,)), if given, receives which
    inputs the last step clipped (the step around the centre nearest the result) or
    the outlier cut removed (decided once, around the node's own model)."""
    n = g.shape[0]
    beta = np.zeros(n, dtype=np.float64)  # centre = own model
    cut = far_outliers(np.sqrt(gram.sq_dist_to_point(g, beta)), f, reject, spread)
    for _ in range(iterations):
        dist = np.sqrt(gram.sq_dist_to_point(g, beta))
        radius = spread_radius(dist, f, spread) if tau is None else tau
        c = _clip_factors(dist, radius)
        if cut is not None:
            c[cut] = 0.0
        beta = beta + (c - c.sum() * beta) / n
        if clipped_out is not None:
            clipped_out[:] = dist > radius
            if cut is not None:
                clipped_out |= cut
    return beta


def centered_clipping(
    x: np.ndarray,
    own: np.ndarray,
    *,
    f: int,
    tau: float | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    reject: float | None = None,
    spread: float | None = None,
    clipped_out: np.ndarray | None = None,
) -> np.ndarray:
    g = gram.centered_gram(x, own)
    beta = centered_clipping_coefficients(
        g,
        f=f,
        tau=tau,
        iterations=iterations,
        reject=reject,
        spread=spread,
        clipped_out=clipped_out,
    )
    return gram.combine(x, own, beta)


def self_centered_clipping(
    x: np.ndarray,
    own: np.ndarray,
    *,
    f: int,
    tau: float | None = None,
    reject: float | None = None,
    spread: float | None = None,
    clipped_out: np.ndarray | None = None,
) -> np.ndarray:
    """own + (1/n) sum_j clip(x_j - own, tau): one ClippedGossip step. `clipped_out`
    (bool (n,)), if given, receives which inputs were clipped."""
    dist = np.sqrt(row_sq_norms(x, own))
    radius = spread_radius(dist, f, spread) if tau is None else tau
    cut = far_outliers(dist, f, reject, spread)
    return _clipped_step(x, own, dist, radius, cut, clipped_out)


def _clipped_step(
    x: np.ndarray,
    own: np.ndarray,
    dist: np.ndarray,
    radius: float,
    cut: np.ndarray | None,
    clipped_out: np.ndarray | None,
) -> np.ndarray:
    """own + (1/n) sum_j clip(x_j - own, radius), given each input's distance to own
    (inputs in `cut` pull nothing): the one step both self-centred rules take; they
    differ only in the radius."""
    c = _clip_factors(dist, radius)
    if cut is not None:
        c[cut] = 0.0
    if clipped_out is not None:
        clipped_out[:] = (dist > radius) if cut is None else (dist > radius) | cut
    return gram.combine(x, own, c / x.shape[0])


def clipped_gossip_tau(sq_dist: np.ndarray, f: int) -> float:
    """ClippedGossip's adaptive radius from the squared distances to my model:
    sqrt(sum of the n - f smallest / f); infinite with f = 0, 0 with f >= n."""
    n = len(sq_dist)
    if f == 0:
        return float("inf")
    if f >= n:
        return 0.0
    keep = n - f
    nearest = np.partition(sq_dist, keep - 1)[:keep]
    return float(np.sqrt(nearest.sum() / f))


def clipped_gossip(
    x: np.ndarray,
    own: np.ndarray,
    *,
    f: int,
    tau: float | None = None,
    reject: float | None = None,
    clipped_out: np.ndarray | None = None,
) -> np.ndarray:
    """own + (1/n) sum_j clip(x_j - own, tau) with ClippedGossip's adaptive radius
    (`clipped_gossip_tau`) unless a fixed `tau` is given. `clipped_out` (bool (n,)), if
    given, receives which inputs were clipped."""
    sq = row_sq_norms(x, own)
    radius = clipped_gossip_tau(sq, f) if tau is None else tau
    dist = np.sqrt(sq)
    return _clipped_step(x, own, dist, radius, far_outliers(dist, f, reject), clipped_out)


def row_sq_norms(x: np.ndarray, own: np.ndarray) -> np.ndarray:
    """||x_i - own||^2 in float64, blockwise (no (n, d) float64 copy)."""
    n, d = x.shape
    out = np.zeros(n, dtype=np.float64)
    buf = np.empty((n, min(d, gram.BLOCK)), dtype=np.float64)
    for s in range(0, d, gram.BLOCK):
        e = min(d, s + gram.BLOCK)
        y = buf[:, : e - s]
        np.subtract(x[:, s:e], own[s:e], out=y, dtype=np.float64)
        out += np.einsum("ij,ij->i", y, y)
    return out
