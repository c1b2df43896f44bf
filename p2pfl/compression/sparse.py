"""Top-k selection and the compact encoding of sorted coordinate indices (Elias-Fano).

A sparse message carries k strictly increasing indices out of d. They travel as an
Elias-Fano code (Elias 1974, Fano 1971): with l = floor(log2(d / k)) "low" bits per
index, each index is split into its low l bits, written as-is, and its high part
h = index >> l, written in unary as a bitmap in which the i-th index sets bit h + i.
That costs k * (l + 1) + ((d - 1) >> l) bits, at most 2 + log2(d / k) bits per
index: ~6.4 bits at top-5% of 2410 coordinates and ~8.6 at top-1% of a million,
where whole-byte gaps took 8 and 16 (the gaps of a top-1% set reach past 255).

Why this code and not a Golomb-Rice one: its size follows from (k, d) alone, so the
receiver knows the exact byte size of the index section before reading it, the same
rule every other part of the message obeys; and it encodes and decodes with a few
vectorised numpy operations (no loop over indices).

Decoding is strict. Exactly k bits of the bitmap must be set, the padding bits of
the last byte must be zero, the indices must come out strictly increasing and below
d. With l fixed by (k, d), every accepted bit string is the one encoding of its index
list (a test re-encodes what the fuzzer gets accepted).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from p2pfl.wire.errors import WireError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


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


def low_bits(count: int, dim: int) -> int:
    """Elias-Fano low-part width l = floor(log2(dim / count)) (0 if count >= dim or 0)."""
    if count <= 0 or dim <= count:
        return 0
    return (dim // count).bit_length() - 1  # floor(log2(floor(x))) == floor(log2(x))


def _layout(count: int, dim: int) -> tuple[int, int]:
    """(low bits per index, bitmap length in bits) for `count` indices below `dim`."""
    low = low_bits(count, dim)
    return low, count + ((dim - 1) >> low)


def index_size(count: int, dim: int) -> int:
    """Exact byte size of the encoding of `count` indices below `dim` (0 for none)."""
    if count <= 0:
        return 0
    low, upper = _layout(count, dim)
    return (count * low + upper + 7) // 8


def encode_indices(idx: I64, dim: int) -> bytes:
    """Elias-Fano code of strictly increasing indices in [0, dim): index_size(k, dim) bytes."""
    n = idx.size
    if n == 0:
        return b""
    low, upper = _layout(n, dim)
    bits = np.zeros(n * low + upper, dtype=np.uint8)
    if low:
        shifts = np.arange(low - 1, -1, -1, dtype=np.int64)  # most significant bit first
        bits[: n * low] = ((idx[:, None] >> shifts) & 1).reshape(-1)
    bits[n * low + (idx >> low) + np.arange(n, dtype=np.int64)] = 1
    return np.packbits(bits).tobytes()


def _bad(message: str) -> WireError:
    return WireError("bad_compression", message)


def decode_indices(data: bytes | memoryview, count: int, dim: int) -> I64:
    """Inverse of encode_indices. `data` must hold exactly index_size(count, dim) bytes.

    WireError("bad_compression") unless exactly `count` high bits are set, the padding
    is zero, and the indices are strictly increasing and below `dim`.
    """
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    low, upper = _layout(count, dim)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    used = count * low + upper
    if bits.size < used:  # pragma: no cover - the caller checks the size
        raise _bad(f"index section has {bits.size} bits, needs {used}")
    if bits[used:].any():
        raise _bad("index padding bits must be zero")
    ones = np.flatnonzero(bits[count * low : used])
    if ones.size != count:
        raise _bad(f"index bitmap has {ones.size} set bits, the header says {count}")
    idx = ones - np.arange(count, dtype=np.int64)  # high parts, non-decreasing
    if low:
        weights = np.left_shift(1, np.arange(low - 1, -1, -1, dtype=np.int64))
        lows = bits[: count * low].reshape(count, low).astype(np.int64) @ weights
        idx = (idx << low) | lows
    if count > 1 and not (idx[1:] > idx[:-1]).all():
        raise _bad("indices must be strictly increasing")
    if idx[-1] >= dim:
        raise _bad(f"index {int(idx[-1])} out of range for dimension {dim}")
    return idx
