"""Split a training set across nodes: IID, label-skewed (Dirichlet) or label clusters.

Each node computes its own shard from (labels, n_nodes, scheme, alpha, seed) with no
coordination, so the functions are pure and seeded: every node derives the same
partition and keeps only its part. Shards are disjoint and cover every sample.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from p2pfl.config import PARTITIONS
from p2pfl.learning.datasets import Dataset

SCHEMES = PARTITIONS
DIRICHLET_ATTEMPTS = 20
"""Redraws of the Dirichlet proportions before falling back to topping up small shards."""

I64 = npt.NDArray[np.int64]


def partition_indices(
    y: np.ndarray,
    n_nodes: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_samples: int | None = None,
    clusters: int = 2,
) -> list[I64]:
    """Indices into `y` for each node (sorted int64 arrays; disjoint; together all of y).

    iid: a seeded permutation cut into near-equal parts (sizes differ by at most 1).
    dirichlet: for every class, proportions over nodes ~ Dirichlet(alpha); small alpha
    means each node sees few labels. So that every node can train, each node gets at
    least `min_samples` (default: min(10, len(y) // n_nodes)): the proportions are
    redrawn up to DIRICHLET_ATTEMPTS times, and if shards are still too small, random
    samples move from the largest shard to the smallest until all reach the minimum.
    clusters: nodes 0..n-1 and the sorted classes are each cut into `clusters`
    contiguous, near-equal blocks; node block j shares (IID) the samples of class
    block j only. With a topology whose communities are index ranges (two cliques
    joined by one edge), each community sees different labels: the hardest case for a
    robust rule, whose honest neighbourhood then disagrees by design.
    """
    labels = np.asarray(y)
    n = labels.shape[0]
    if labels.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {labels.shape}")
    if not 1 <= n_nodes <= n:
        raise ValueError(f"n_nodes must be in [1, {n}] for {n} samples, got {n_nodes}")
    rng = np.random.default_rng([seed, 0xD15C])
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), n_nodes)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        floor = min(10, n // n_nodes) if min_samples is None else min_samples
        if not 0 <= floor <= n // n_nodes:
            raise ValueError(f"min_samples must be in [0, {n // n_nodes}], got {floor}")
        parts = _dirichlet(labels, n_nodes, alpha, floor, rng)
    elif scheme == "clusters":
        parts = _clusters(labels, n_nodes, clusters, rng)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    y: np.ndarray, n_nodes: int, alpha: float, floor: int, rng: np.random.Generator
) -> list[I64]:
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    parts: list[I64] = []
    for _ in range(DIRICHLET_ATTEMPTS):
        parts = _dirichlet_draw(by_class, n_nodes, alpha, rng)
        if min(p.size for p in parts) >= floor:
            return parts
    return _top_up(parts, floor, rng)


def _dirichlet_draw(
    by_class: list[I64], n_nodes: int, alpha: float, rng: np.random.Generator
) -> list[I64]:
    pieces: list[list[I64]] = [[] for _ in range(n_nodes)]
    for members in by_class:
        shuffled = rng.permutation(members)
        proportions = rng.dirichlet(np.full(n_nodes, alpha))
        cuts = np.floor(np.cumsum(proportions)[:-1] * shuffled.size).astype(np.int64)
        for node, chunk in enumerate(np.split(shuffled, cuts)):
            pieces[node].append(chunk)
    return [np.concatenate(p) for p in pieces]


def _clusters(y: np.ndarray, n_nodes: int, k: int, rng: np.random.Generator) -> list[I64]:
    classes = np.unique(y)
    if not 1 <= k <= min(n_nodes, classes.size):
        raise ValueError(
            f"clusters must be in [1, {min(n_nodes, classes.size)}] for {n_nodes} nodes "
            f"and {classes.size} classes, got {k}"
        )
    parts: list[I64] = []
    node_blocks = np.array_split(np.arange(n_nodes), k)
    for nodes, block in zip(node_blocks, np.array_split(classes, k), strict=True):
        members = rng.permutation(np.flatnonzero(np.isin(y, block)))
        if members.size < nodes.size:
            raise ValueError(f"classes {block.tolist()} have fewer samples than nodes")
        parts += np.array_split(members, nodes.size)
    return parts


def _top_up(parts: list[I64], floor: int, rng: np.random.Generator) -> list[I64]:
    """Move random samples from the largest shard to the smallest until all reach floor.

    Terminates because floor <= n // n_nodes, so the largest shard always has spare.
    """
    parts = [rng.permutation(p) for p in parts]
    sizes = np.array([p.size for p in parts])
    while sizes.min() < floor:
        small, big = int(sizes.argmin()), int(sizes.argmax())
        moved = min(floor - sizes[small], sizes[big] - floor)
        parts[small] = np.concatenate([parts[small], parts[big][:moved]])
        parts[big] = parts[big][moved:]
        sizes[small] += moved
        sizes[big] -= moved
    return parts


def node_shard(
    ds: Dataset,
    index: int,
    n_nodes: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    clusters: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) training shard of node `index` (0-based) out of `n_nodes`.

    The test set is not partitioned: every node evaluates on the shared `ds.x_test`.
    """
    if not 0 <= index < n_nodes:
        raise ValueError(f"node index must be in [0, {n_nodes}), got {index}")
    idx = _cached_partition(ds, n_nodes, scheme, alpha, seed, clusters)[index]
    return ds.x_train[idx], ds.y_train[idx]


@functools.lru_cache(maxsize=32)
def _cached_partition(
    ds: Dataset, n_nodes: int, scheme: str, alpha: float, seed: int, clusters: int
) -> list[I64]:
    """Computed once per process for all in-process nodes (Dataset hashes by identity)."""
    return partition_indices(
        ds.y_train, n_nodes, scheme=scheme, alpha=alpha, seed=seed, clusters=clusters
    )
