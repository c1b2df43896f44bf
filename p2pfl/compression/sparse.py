"""Top-k selection and the compact encoding of sorted coordinate indices.

Indices travel as gaps: the first index, then for each later one the distance to its
predecessor minus one. Gaps of a top-1% set are ~100, so they fit one or two bytes
where raw indices need four, and they repeat enough for zstd to shrink further. The
"minus one" makes every decodable gap sequence strictly increasing by construction:
a receiver cannot be handed unsorted or duplicate indices, only out-of-range ones,
which it checks with one comparison of the last index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from p2pfl.wire.errors import WireError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

INDEX_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
}
"""Gap width in bytes -> little-endian unsigned dtype. Nothing else is accepted."""


def top_k(u: F32, k: int) -> I64:
    """Sorted indices of the k largest |u|, ties at the threshold broken by position.

    Finds the k-th largest magnitude with np.partition (O(d)) and then scans for
    everything at or above it, which comes out sorted; measured ~1.5x faster than
    argpartition followed by a sort.
    """
    d = u.size
    if k >= d:
        return np.arange(d, dtype=np.int64)
    a = np.abs(u)
    threshold = np.partition(a, d - k)[d - k]
    idx = np.flatnonzero(a >= threshold)
    if idx.size > k:  # ties at the threshold: all strictly above, then the first ties
        above = np.flatnonzero(a > threshold)
        ties = np.flatnonzero(a == threshold)[: k - above.size]
        idx = np.sort(np.concatenate([above, ties]))
    return idx.astype(np.int64, copy=False)


def encode_indices(idx: I64) -> tuple[bytes, int]:
    """Gap-encode strictly increasing indices in the narrowest width that fits: (bytes, width)."""
    if idx.size == 0:
        return b"", 1
    gaps = np.empty(idx.size, dtype=np.int64)
    gaps[0] = idx[0]
    np.subtract(idx[1:], idx[:-1], out=gaps[1:])
    gaps[1:] -= 1
    top = int(gaps.max())
    width = 1 if top < 1 << 8 else 2 if top < 1 << 16 else 4
    return gaps.astype(INDEX_DTYPES[width]).tobytes(), width


def decode_indices(data: bytes | memoryview, count: int, width: int, dim: int) -> I64:
    """Inverse of encode_indices; WireError("bad_compression") if any index is >= dim."""
    gaps = np.frombuffer(data, dtype=INDEX_DTYPES[width], count=count)
    idx = np.cumsum(gaps, dtype=np.int64)
    idx += np.arange(count, dtype=np.int64)  # undo the "minus one" of every later gap
    if count and idx[-1] >= dim:
        raise WireError("bad_compression", f"index {int(idx[-1])} out of range for dimension {dim}")
    return idx
