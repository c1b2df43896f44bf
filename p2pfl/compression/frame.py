"""The self-describing blob one compressed update travels as (sans-IO, both directions).

    {"stages": ["delta", "topk:0.01", "quantize:8", "zstd:3"],  # what this message went through
     "base": 41,        # round of the x_hat it is relative to; -1 = keyframe (full model)
     "payload": {"dim": d, "count": k, "iw": w, "data": bin}}

`data` (after undoing zstd) is the concatenation, in this order, of the gap-encoded
indices (k * w bytes; sparse messages only), the block scales (int8/int4 only) and
the k values. Everything except the bytes inside `data` is implied by the header, so
a receiver computes the exact size `data` must have before reading (or inflating) it.
Parsing is split in two so a receiver can reject a message it has no base for before
paying for decompression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pfl.compression.entropy import decompress_exact
from p2pfl.compression.pipeline import Pipeline, parse_pipeline
from p2pfl.compression.quantize import decode_values, values_size
from p2pfl.compression.sparse import INDEX_DTYPES, decode_indices
from p2pfl.wire.errors import WireError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

BLOB_KEYS = frozenset({"stages", "base", "payload"})
PAYLOAD_KEYS = frozenset({"dim", "count", "iw", "data"})
MAX_STAGES = 4
MAX_ROUND = 2**53


def body_size(pipeline: Pipeline, count: int, index_width: int) -> int:
    """Exact byte size of `data` before zstd."""
    return count * index_width + values_size(count, pipeline.quantize)


def make_blob(
    stages: list[str], base: int, dim: int, count: int, index_width: int, data: bytes
) -> dict[str, Any]:
    return {
        "stages": stages,
        "base": base,
        "payload": {"dim": dim, "count": count, "iw": index_width, "data": data},
    }


@dataclass(frozen=True, slots=True)
class Header:
    """A structurally valid blob whose `data` has not been looked at yet."""

    pipeline: Pipeline
    base: int
    count: int
    index_width: int  # 0 for dense messages
    data: bytes

    @property
    def keyframe(self) -> bool:
        return self.base == -1

    @property
    def sparse(self) -> bool:
        return self.index_width != 0


def _bad(message: str) -> WireError:
    return WireError("bad_compression", message)


def _int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _map(name: str, value: object, keys: frozenset[str]) -> dict[str, Any]:
    if type(value) is not dict:
        raise _bad(f"{name} must be a map, got {type(value).__name__}")
    if set(value) != keys:
        raise _bad(f"{name} keys must be {sorted(keys)}, got {sorted(map(_short, value))}")
    return value


def parse_header(blob: object, *, dim: int, round: int) -> Header:
    """Check everything but the content of `data`; WireError("bad_compression") otherwise."""
    top = _map("blob", blob, BLOB_KEYS)
    stages = top["stages"]
    if type(stages) is not list or len(stages) > MAX_STAGES:
        raise _bad(f"stages must be a list of at most {MAX_STAGES} strings")
    if not all(type(s) is str for s in stages):
        raise _bad("stages must be strings")
    try:
        pipeline = parse_pipeline(stages)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if not pipeline.delta and pipeline.topk is not None:  # pragma: no cover - parser refuses
        raise _bad("top-k without delta")
    if not 0 <= round < MAX_ROUND:
        raise _bad(f"round {round} out of range")
    base = _int("base", top["base"], -1, max(round - 1, -1))
    if (base == -1) == pipeline.delta:
        raise _bad("base must be -1 exactly when the stages have no 'delta' (a keyframe)")
    payload = _map("payload", top["payload"], PAYLOAD_KEYS)
    _int("dim", payload["dim"], dim, dim)
    if pipeline.topk is not None:
        width = payload["iw"]
        if type(width) is not int or width not in INDEX_DTYPES:
            raise _bad(f"index width must be one of {sorted(INDEX_DTYPES)}, got {_short(width)}")
        count = _int("count", payload["count"], 0, dim)
    else:
        width = _int("iw", payload["iw"], 0, 0)
        count = _int("count", payload["count"], dim, dim)
    data = payload["data"]
    if type(data) is not bytes:
        raise _bad(f"data must be binary, got {type(data).__name__}")
    return Header(pipeline, base, count, width, data)


def read_body(header: Header, *, dim: int, limit: int) -> tuple[I64 | None, F32]:
    """(indices or None for dense, values) from a parsed header; inflates at most `limit`."""
    expected = body_size(header.pipeline, header.count, header.index_width)
    if expected > limit:
        raise WireError(
            "decompression_bomb", f"message needs {expected} bytes, frame limit is {limit}"
        )
    if header.pipeline.zstd is not None:
        raw = decompress_exact(header.data, expected, limit)
    else:
        raw = header.data
        if len(raw) != expected:
            raise _bad(f"data has {len(raw)} bytes, the header implies {expected}")
    view = memoryview(raw)
    idx = None
    split = 0
    if header.sparse:
        split = header.count * header.index_width
        idx = decode_indices(view[:split], header.count, header.index_width, dim)
    values = decode_values(view[split:], header.count, header.pipeline.quantize)
    return idx, values
