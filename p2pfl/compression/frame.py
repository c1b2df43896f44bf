"""The self-describing blob one compressed update travels as (sans-IO, both directions).

    {"f": flags,   # what this message went through (bits below)
     "b": base,    # round of the x_hat it is relative to; -1 = keyframe (full model)
     "d": dim,     # model size (must be the receiver's)
     "n": count,   # values carried (dim unless sparse)
     "x": bin}     # the body, a zstd frame when flag ZSTD is set

    flags = DELTA (1) | SPARSE (2) | quantization << 2 (0 float32, 1 float16,
            2 int8, 3 int4) | ZSTD (16)

The body (after undoing zstd) is the concatenation, in this order, of the indices'
Elias-Fano code (sparse messages only, `p2pfl.compression.sparse`), the block scales
(int8/int4 only) and the `count` values. Its exact size follows from the header, so a
receiver computes the size it must have before reading (or inflating) it. Parsing is
split in two so a receiver can reject a message it has no base for before paying for
decompression.

Why flags and one-letter keys rather than stage names (the format before 2026-12-04:
{"stages": [...], "base", "payload": {"dim", "count", "iw", "data"}}): the names and
keys took 83 bytes of every message, more than the indices of a 2410-parameter
top-5% update. The receiver needs only what the flags say; the top-k fraction, zstd
level and rounding mode are the sender's business (`count` says how many values
came). The old format is refused with a message saying so.

zstd is applied only when it makes the body smaller (on a small sparse body its
frame header and tables cost more than they save); the ZSTD flag says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pfl.compression.entropy import decompress_exact
from p2pfl.compression.pipeline import Pipeline, Quantize
from p2pfl.compression.quantize import decode_values, values_size
from p2pfl.compression.sparse import decode_indices, index_size
from p2pfl.wire.errors import WireError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

BLOB_KEYS = frozenset({"f", "b", "d", "n", "x"})
OLD_KEYS = frozenset({"stages", "base", "payload"})
MAX_ROUND = 2**53

DELTA = 1
SPARSE = 2
QUANT_SHIFT = 2
QUANT_MASK = 3 << QUANT_SHIFT
ZSTD = 16
ALL_FLAGS = DELTA | SPARSE | QUANT_MASK | ZSTD
_QUANT_CODE = {None: 0, 16: 1, 8: 2, 4: 3}
_CODE_QUANT: dict[int, Quantize | None] = {0: None, 1: Quantize(16), 2: Quantize(8), 3: Quantize(4)}


def flags(pipeline: Pipeline, *, keyframe: bool, zstd: bool) -> int:
    """The flags of one message of `pipeline` (a keyframe has no delta and no top-k)."""
    out = 0 if keyframe else DELTA | (SPARSE if pipeline.topk is not None else 0)
    bits = pipeline.quantize.bits if pipeline.quantize is not None else None
    return out | _QUANT_CODE[bits] << QUANT_SHIFT | (ZSTD if zstd else 0)


def body_size(quant: Quantize | None, count: int, dim: int, sparse: bool) -> int:
    """Exact byte size of the body before zstd."""
    return (index_size(count, dim) if sparse else 0) + values_size(count, quant)


def make_blob(flag_bits: int, base: int, dim: int, count: int, data: bytes) -> dict[str, Any]:
    return {"f": flag_bits, "b": base, "d": dim, "n": count, "x": data}


@dataclass(frozen=True, slots=True)
class Header:
    """A structurally valid blob whose body has not been looked at yet."""

    flags: int
    base: int
    count: int
    data: bytes

    @property
    def keyframe(self) -> bool:
        return self.base == -1

    @property
    def sparse(self) -> bool:
        return bool(self.flags & SPARSE)

    @property
    def zstd(self) -> bool:
        return bool(self.flags & ZSTD)

    @property
    def quantize(self) -> Quantize | None:
        return _CODE_QUANT[(self.flags & QUANT_MASK) >> QUANT_SHIFT]


def _bad(message: str) -> WireError:
    return WireError("bad_compression", message)


def _int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_header(blob: object, *, dim: int, round: int) -> Header:
    """Check everything but the content of the body; WireError("bad_compression") otherwise."""
    if type(blob) is not dict:
        raise _bad(f"blob must be a map, got {type(blob).__name__}")
    if set(blob) != BLOB_KEYS:
        if set(blob) == OLD_KEYS:
            raise _bad("blob is in the format before 2026-12-04 (stages/payload): peer too old")
        raise _bad(f"blob keys must be {sorted(BLOB_KEYS)}, got {sorted(map(_short, blob))}")
    bits = _int("flags", blob["f"], 0, ALL_FLAGS)
    delta = bool(bits & DELTA)
    if bits & SPARSE and not delta:
        raise _bad("flags: sparse (top-k) without delta")
    if not 0 <= round < MAX_ROUND:
        raise _bad(f"round {round} out of range")
    base = _int("base", blob["b"], -1, max(round - 1, -1))
    if (base == -1) == delta:
        raise _bad("base must be -1 exactly when the flags have no delta (a keyframe)")
    _int("dim", blob["d"], dim, dim)
    if bits & SPARSE:
        count = _int("count", blob["n"], min(1, dim), dim)
    else:
        count = _int("count", blob["n"], dim, dim)
    data = blob["x"]
    if type(data) is not bytes:
        raise _bad(f"data must be binary, got {type(data).__name__}")
    return Header(bits, base, count, data)


def read_body(header: Header, *, dim: int, limit: int) -> tuple[I64 | None, F32]:
    """(indices or None for dense, values) from a parsed header; inflates at most `limit`."""
    expected = body_size(header.quantize, header.count, dim, header.sparse)
    if expected > limit:
        raise WireError(
            "decompression_bomb", f"message needs {expected} bytes, frame limit is {limit}"
        )
    if header.zstd:
        raw = decompress_exact(header.data, expected, limit)
    else:
        raw = header.data
        if len(raw) != expected:
            raise _bad(f"data has {len(raw)} bytes, the header implies {expected}")
    view = memoryview(raw)
    idx = None
    split = 0
    if header.sparse:
        split = index_size(header.count, dim)
        idx = decode_indices(view[:split], header.count, dim)
    values = decode_values(view[split:], header.count, header.quantize)
    return idx, values
