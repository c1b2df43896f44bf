"""Coordinate-wise order statistics of a few stacked rows, via sorting networks.

`np.median(axis=0)` / `np.partition(axis=0)` on an (n, d) stack run a separate
introselect per coordinate: tens of nanoseconds each, 15-70x slower than reading the
input once. With n small (a node's neighbourhood), a sorting network does the same
job as ~n log^2 n element-wise `minimum`/`maximum` calls on whole rows, which numpy
runs at SIMD speed. We process the columns in cache-sized blocks and keep only the
comparators that can affect the positions we need (median: the middle; trimmed mean:
the boundaries of the trimmed tails), so a median of 8 costs 17 comparators, not 19.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np

# Columns per block: n rows of this many float32 stay in L2 for the neighbourhood
# sizes we use the network for.
BLOCK = 32768
# Above this many rows the network grows as n log^2 n calls; introselect wins.
MAX_NETWORK_ROWS = 64

Comparator = tuple[int, int]


@lru_cache(maxsize=256)
def batcher_network(n: int) -> tuple[Comparator, ...]:
    """Batcher's odd-even merge sort for n inputs (i < j: min goes to i, max to j).

    Built for the next power of two; comparators touching the padding are dropped,
    which is exact because padding acts as +inf and always sits at the high end.
    """
    size = 1
    while size < n:
        size *= 2
    comps: list[Comparator] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comps.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((a, b) for a, b in comps if b < n)


@lru_cache(maxsize=1024)
def selection_network(n: int, needed: tuple[int, ...]) -> tuple[Comparator, ...]:
    """The comparators of `batcher_network(n)` that can influence outputs `needed`.

    Positions outside `needed` end up holding the right *multiset* (not order), which
    is all a trimmed sum needs.
    """
    need = set(needed)
    kept: list[Comparator] = []
    for a, b in reversed(batcher_network(n)):
        if a in need or b in need:
            kept.append((a, b))
            need.update((a, b))
    return tuple(reversed(kept))


def _run_block(x: np.ndarray, comps: Iterable[Comparator], work: np.ndarray) -> list[np.ndarray]:
    """Apply comparators to the rows of the block `x` (not modified); returns the rows.

    Rows start as views of `x`; a row moves into a buffer of `work` ((n + 1, >= m)
    float32, reused across blocks) the first time a comparator writes it, so the block
    is never copied up front and nothing is allocated per block (fresh 128 KB arrays
    would cost a page fault per page, every block).
    """
    m = x.shape[1]
    rows = list(x)
    owned = [False] * len(rows)
    free = [work[i, :m] for i in range(len(work))]
    for a, b in comps:
        ra, rb = rows[a], rows[b]
        lo = np.minimum(ra, rb, out=free.pop())
        if owned[b]:
            np.maximum(ra, rb, out=rb)
        else:
            rows[b] = np.maximum(ra, rb, out=free.pop())
            owned[b] = True
        if owned[a]:
            free.append(ra)
        rows[a] = lo
        owned[a] = True
    return rows


def median(x: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of (n, d) float32 (mean of the two middles when n is even)."""
    n, d = x.shape
    lo_k, hi_k = (n - 1) // 2, n // 2
    if n > MAX_NETWORK_ROWS:
        part = np.partition(x, (lo_k, hi_k), axis=0)
        return _half_sum(part[lo_k], part[hi_k])
    comps = selection_network(n, (lo_k, hi_k))
    out = np.empty(d, dtype=np.float32)
    work = np.empty((n + 1, min(d, BLOCK)), dtype=np.float32)
    for s in range(0, d, BLOCK):
        rows = _run_block(x[:, s : s + BLOCK], comps, work)
        out[s : s + BLOCK] = rows[lo_k] if lo_k == hi_k else _half_sum(rows[lo_k], rows[hi_k])
    return out


def trimmed_sum(x: np.ndarray, b: int) -> np.ndarray:
    """Per coordinate, the float64 sum of the values left after dropping the b smallest
    and the b largest. Summed directly, never as total minus tails: an outlier of 1e30
    would otherwise wipe out the honest values' digits."""
    n, d = x.shape
    if not 0 <= 2 * b < n:
        raise ValueError(f"cannot trim {b} from each side of {n} inputs")
    if b == 0:
        return np.asarray(x.sum(axis=0, dtype=np.float64))
    tails = (*range(b), *range(n - b, n))
    if n > MAX_NETWORK_ROWS:
        part = np.partition(x, (b - 1, n - b), axis=0)
        return np.asarray(part[b : n - b].sum(axis=0, dtype=np.float64))
    comps = selection_network(n, tails)
    out = np.empty(d, dtype=np.float64)
    work = np.empty((n + 1, min(d, BLOCK)), dtype=np.float32)
    for s in range(0, d, BLOCK):
        rows = _run_block(x[:, s : s + BLOCK], comps, work)
        acc = out[s : s + BLOCK]
        acc[:] = rows[b]
        for i in range(b + 1, n - b):
            acc += rows[i]
    return out


def _half_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) / 2 without overflowing float32 near its maximum."""
    return np.asarray(a * np.float32(0.5) + b * np.float32(0.5), dtype=np.float32)
