"""Coordinate-wise order statistics of a few stacked rows, via sorting networks.

`np.median(axis=0)` / `np.partition(axis=0)` on an (n, d) stack run a separate
introselect per coordinate: tens of nanoseconds each, 15-70x slower than reading the
input once. With n small (a node's neighbourhood), a sorting network does the same
job as ~n log^2 n element-wise `minimum`/`maximum` calls on whole rows, which numpy
runs at SIMD speed. We process the columns in cache-sized blocks and keep only the
comparators that can affect the positions we need (median: the middle; trimmed mean:
the boundaries of the trimmed tails), so a median of 8 costs 17 comparators, not 19,
and a comparator whose min or max is never read again runs as one pass, not two.
The network is compiled once per shape into a flat list of ufunc calls on reused
row buffers, so the per-block Python work is one call per pass.
"""

from __future__ import annotations

from collections.abc import Iterator
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


# One step of a compiled network: (ufunc, first input, second input, output), the
# operands being slots of a block's row table (n input rows, then the work rows).
Step = tuple[np.ufunc, int, int, int]


@lru_cache(maxsize=1024)
def compile_network(
    n: int, needed: tuple[int, ...], multiset: bool
) -> tuple[tuple[Step, ...], tuple[int, ...], int]:
    """Turn `selection_network(n, needed)` into a flat list of ufunc calls on row slots.

    Returns (steps, slot of each output position, work rows needed). Slots 0..n-1 are
    the block's input rows (read only); n.. are reusable work rows. A row moves into a
    work row the first time a comparator writes it, so the block is never copied up
    front. Unless `multiset` (every position must keep its value), a comparator whose
    max (or min) nobody reads any more runs as a single `minimum` (`maximum`): a median
    of 32 needs 284 element-wise passes instead of 314. Planning once per shape keeps
    the per-block Python work to one call per pass.
    """
    comps = selection_network(n, needed)
    # Which outputs of each comparator are read later (backwards liveness).
    live = set(needed)
    uses: list[tuple[bool, bool]] = []
    for a, b in reversed(comps):
        uses.append((multiset or a in live, multiset or b in live))
        live.update((a, b))
    uses.reverse()
    slot = list(range(n))
    free: list[int] = []
    top = n
    steps: list[Step] = []

    def fresh() -> int:
        nonlocal top
        if free:
            return free.pop()
        top += 1
        return top - 1

    for (a, b), (need_lo, need_hi) in zip(comps, uses, strict=True):
        sa, sb = slot[a], slot[b]
        if need_lo and need_hi:
            lo = fresh()
            steps.append((np.minimum, sa, sb, lo))
            hi = sb if sb >= n else fresh()
            steps.append((np.maximum, sa, sb, hi))
            if sa >= n:
                free.append(sa)
            slot[a], slot[b] = lo, hi
        elif need_lo:
            lo = sa if sa >= n else fresh()
            steps.append((np.minimum, sa, sb, lo))
            slot[a] = lo
        else:
            hi = sb if sb >= n else fresh()
            steps.append((np.maximum, sa, sb, hi))
            slot[b] = hi
    return tuple(steps), tuple(slot), top - n


def _blocks(
    x: np.ndarray, needed: tuple[int, ...], multiset: bool
) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """Run the compiled network over cache-sized column blocks of `x` (not modified).

    Yields (start, stop, row of each position) per block; the rows live in work
    buffers reused by the next block, so consume them before iterating on. Nothing is
    allocated per block (fresh 128 KB arrays would cost a page fault per page).
    """
    n, d = x.shape
    steps, out_slot, extra = compile_network(n, needed, multiset)
    block = BLOCK
    width = min(d, block)
    work = list(np.empty((extra, width), dtype=np.float32))
    for s in range(0, d, block):
        e = min(d, s + block)
        rows = [*x[:, s:e], *(w[: e - s] for w in work)] if e - s < width else [*x[:, s:e], *work]
        for ufunc, i, j, o in steps:
            ufunc(rows[i], rows[j], out=rows[o])
        yield s, e, [rows[k] for k in out_slot]


def median(x: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of (n, d) float32 (mean of the two middles when n is even)."""
    n, d = x.shape
    lo_k, hi_k = (n - 1) // 2, n // 2
    if n > MAX_NETWORK_ROWS:
        part = np.partition(x, (lo_k, hi_k), axis=0)
        return _half_sum(part[lo_k], part[hi_k])
    out = np.empty(d, dtype=np.float32)
    for s, e, rows in _blocks(x, (lo_k, hi_k), multiset=False):
        out[s:e] = rows[lo_k] if lo_k == hi_k else _half_sum(rows[lo_k], rows[hi_k])
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
    out = np.empty(d, dtype=np.float64)
    for s, e, rows in _blocks(x, tails, multiset=True):
        acc = out[s:e]
        acc[:] = rows[b]
        for i in range(b + 1, n - b):
            acc += rows[i]
    return out


def _half_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a + b) / 2 without overflowing float32 near its maximum."""
    return np.asarray(a * np.float32(0.5) + b * np.float32(0.5), dtype=np.float32)
