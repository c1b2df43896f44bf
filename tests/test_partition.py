"""Partitioners: disjoint, complete, deterministic; IID balanced, Dirichlet skewed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.learning import load_dataset, node_shard, partition_indices


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert joined.size == n  # no index twice...
    assert np.array_equal(np.sort(joined), np.arange(n))  # ...and every index once


def _top2_share(y: np.ndarray) -> float:
    counts = np.sort(np.bincount(y, minlength=10))[::-1]
    return float(counts[:2].sum() / counts.sum())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "clusters"])
def test_partition_is_exact_cover_and_deterministic(scheme: str) -> None:
    y = load_dataset("digits").y_train
    parts = partition_indices(y, 8, scheme=scheme, alpha=0.3, seed=5)
    assert len(parts) == 8
    _assert_exact_cover(parts, len(y))
    again = partition_indices(y, 8, scheme=scheme, alpha=0.3, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(y, 8, scheme=scheme, alpha=0.3, seed=6)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_balanced() -> None:
    y = load_dataset("digits").y_train
    parts = partition_indices(y, 8, scheme="iid", seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # Each node sees every label and no two labels dominate (uniform would be 0.2).
    assert all(np.unique(y[p]).size == 10 for p in parts)
    assert max(_top2_share(y[p]) for p in parts) < 0.35


def test_dirichlet_small_alpha_is_skewed() -> None:
    y = load_dataset("digits").y_train
    parts = partition_indices(y, 8, scheme="dirichlet", alpha=0.1, seed=0)
    shares = [_top2_share(y[p]) for p in parts]
    # Most nodes are dominated by two labels; IID nodes are near 0.2.
    assert sum(s > 0.7 for s in shares) >= 6, shares
    assert np.mean([np.unique(y[p]).size for p in parts]) < 6
    assert min(p.size for p in parts) >= 10


def test_dirichlet_tops_up_tiny_shards() -> None:
    # 100 nodes, ~14 samples each, alpha 0.05: redraws alone cannot give everyone 10.
    y = load_dataset("digits").y_train
    parts = partition_indices(y, 100, scheme="dirichlet", alpha=0.05, seed=0)
    _assert_exact_cover(parts, len(y))
    assert min(p.size for p in parts) >= 10
    parts = partition_indices(y, 100, scheme="dirichlet", alpha=0.05, seed=0, min_samples=3)
    assert min(p.size for p in parts) >= 3


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    n_classes=st.integers(1, 6),
    nodes=st.integers(1, 40),
    alpha=st.floats(0.01, 100.0),
    scheme=st.sampled_from(["iid", "dirichlet"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_properties(
    n: int, n_classes: int, nodes: int, alpha: float, scheme: str, seed: int
) -> None:
    nodes = min(nodes, n)
    y = np.random.default_rng(seed).integers(0, n_classes, size=n)
    parts = partition_indices(y, nodes, scheme=scheme, alpha=alpha, seed=seed)
    assert len(parts) == nodes
    _assert_exact_cover(parts, n)
    assert min(p.size for p in parts) >= min(10, n // nodes)


def test_clusters_give_each_block_of_nodes_its_own_labels() -> None:
    y = load_dataset("digits").y_train
    parts = partition_indices(y, 20, scheme="clusters", clusters=2, seed=0)
    _assert_exact_cover(parts, len(y))
    # Nodes 0-9 see exactly digits 0-4, nodes 10-19 exactly 5-9, IID within the block.
    for i, p in enumerate(parts):
        labels = set(np.unique(y[p]).tolist())
        assert labels == (set(range(5)) if i < 10 else set(range(5, 10))), (i, labels)
    sizes = [p.size for p in parts[:10]]
    assert max(sizes) - min(sizes) <= 1
    # Uneven splits: 7 nodes, 3 clusters -> node blocks 3/2/2, class blocks 4/3/3.
    parts = partition_indices(y, 7, scheme="clusters", clusters=3, seed=1)
    assert [sorted(set(np.unique(y[p]).tolist())) for p in parts] == [
        *[[0, 1, 2, 3]] * 3,
        *[[4, 5, 6]] * 2,
        *[[7, 8, 9]] * 2,
    ]
    one = partition_indices(y, 4, scheme="clusters", clusters=1, seed=0)
    assert all(np.unique(y[p]).size == 10 for p in one)  # one cluster = IID


def test_partition_rejects_bad_arguments() -> None:
    y = np.arange(10) % 3
    with pytest.raises(ValueError, match="iid, dirichlet"):
        partition_indices(y, 2, scheme="shards")
    with pytest.raises(ValueError, match="n_nodes"):
        partition_indices(y, 0)
    with pytest.raises(ValueError, match="n_nodes"):
        partition_indices(y, 11)
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(y, 2, scheme="dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="min_samples"):
        partition_indices(y, 2, scheme="dirichlet", min_samples=6)
    with pytest.raises(ValueError, match="clusters must be in"):
        partition_indices(y, 4, scheme="clusters", clusters=4)  # only 3 classes
    with pytest.raises(ValueError, match="clusters must be in"):
        partition_indices(y, 2, scheme="clusters", clusters=0)
    with pytest.raises(ValueError, match="fewer samples than nodes"):
        partition_indices(np.array([0, 0, 0, 1]), 4, scheme="clusters", clusters=2)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "clusters"])
def test_node_shards_are_disjoint_and_match_partition(scheme: str) -> None:
    ds = load_dataset("digits")
    parts = partition_indices(ds.y_train, 5, scheme=scheme, alpha=0.5, seed=2)
    rows = set()
    for i, idx in enumerate(parts):
        x, y = node_shard(ds, i, 5, scheme=scheme, alpha=0.5, seed=2)
        assert np.array_equal(x, ds.x_train[idx]) and np.array_equal(y, ds.y_train[idx])
        assert x.flags.writeable  # a private copy, not a view of the shared arrays
        rows.update(idx.tolist())
    assert len(rows) == len(ds.y_train)


def test_node_shard_rejects_bad_index() -> None:
    ds = load_dataset("digits")
    for bad in (-1, 8, 100):
        with pytest.raises(ValueError, match="index"):
            node_shard(ds, bad, 8)
