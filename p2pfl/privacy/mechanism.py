"""The Gaussian mechanism on a node's round update: clip to an L2 norm, add noise.

Why here and in this shape: what a node sends is its round's start model plus its update
(the model after local training minus the model it started from). Bounding the update's
L2 norm by C bounds how much any one node's whole data set can move what it sends (the
sensitivity, under "with this node's data" vs "without it", where the update is zero);
adding N(0, (sigma * C)^2) to every coordinate then makes each release a Gaussian
mechanism with noise multiplier sigma, which is what the accountant composes
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", the
user-level DP-FedAvg; here each node is its own "user" and noises its own update).

Numpy only, vectorised; the norm is summed in float64 (a chunk at a time, so a large
model needs no float64 copy of itself), so that float32 accumulation never lets a
clipped update exceed C by more than float32's own rounding of each coordinate. The
caller passes the random generator: a real node draws from OS entropy, never from the
configured seed (a known seed would let anyone regenerate and subtract the noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NORM_CHUNK = 1 << 20  # coordinates per float64 chunk of the norm (8 MiB)


@dataclass(frozen=True)
class Release:
    """What one application of the mechanism produced."""

    params: np.ndarray  # start + clipped update + noise (float32): what leaves the node
    norm: float  # the update's L2 norm before clipping
    clipped: bool  # the update was scaled down to the clip norm


def clip_update(update: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """`update` scaled to L2 norm <= `clip` (a new float32 array) and its norm before.

    An update already within the bound is copied unchanged: clipping only ever shrinks.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"the clip norm must be a finite number > 0, got {clip!r}")
    u = np.asarray(update, dtype=np.float32)
    total = 0.0
    for i in range(0, u.size, NORM_CHUNK):
        chunk = u[i : i + NORM_CHUNK].astype(np.float64)
        total += float(np.dot(chunk, chunk))
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise ValueError("the update is not finite")
    if norm <= clip:
        return u.copy(), norm
    return u * np.float32(clip / norm), norm


def gaussian_release(
    start: np.ndarray,
    trained: np.ndarray,
    *,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> Release:
    """start + clip(trained - start, clip) + N(0, (noise_multiplier * clip)^2 I)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"the noise multiplier must be >= 0, got {noise_multiplier!r}")
    s = np.asarray(start, dtype=np.float32)
    t = np.asarray(trained, dtype=np.float32)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"start and trained must be flat and alike, got {s.shape}, {t.shape}")
    update, norm = clip_update(t - s, clip)
    if noise_multiplier > 0:
        noise = rng.standard_normal(update.size, dtype=np.float32)
        noise *= np.float32(noise_multiplier * clip)
        update += noise
    update += s
    return Release(update, norm, norm > clip)
