"""Tensors on the wire: raw little-endian bytes plus dtype code and shape.

A tensor is the msgpack map `{"dtype": code, "shape": [dims], "data": bin}`. Only a
short allow-list of plain numeric dtypes exists, so a peer can never make us build an
object array (or anything else that could run code or alias memory). Encoding hands
msgpack a memoryview of the array (no copy); decoding wraps the received bin with
`np.frombuffer` (no copy, read-only result).

Errors on the encode side are local bugs and raise ValueError; errors on the decode
side come from a peer and raise WireError("bad_tensor").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from p2pfl.wire.errors import WireError

DTYPES: dict[str, np.dtype[Any]] = {
    "f4": np.dtype("<f4"),
    "f2": np.dtype("<f2"),
    "i1": np.dtype("i1"),
    "u1": np.dtype("u1"),
    "i4": np.dtype("<i4"),
    "u4": np.dtype("<u4"),
}
"""Wire dtype code -> little-endian numpy dtype. Nothing else is ever accepted."""

_CODES: dict[str, str] = {dt.newbyteorder("<").str: code for code, dt in DTYPES.items()}
TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
MAX_DIMS = 8
# Ceiling on the product of the non-zero dimensions when the caller sets no element
# limit: numpy refuses shapes whose nominal size overflows even when one dim is 0.
_HARD_MAX_ELEMENTS = 2**48


def dtype_code(dtype: np.dtype[Any]) -> str:
    """The wire code of `dtype` (any byte order); ValueError if it may not travel."""
    code = _CODES.get(dtype.newbyteorder("<").str)
    if code is None:
        raise ValueError(f"dtype {dtype} cannot travel on the wire (allowed: {sorted(DTYPES)})")
    return code


def encode_tensor(a: np.ndarray) -> dict[str, Any]:
    """Describe `a` for msgpack; `data` is a zero-copy view whenever `a` allows it.

    Big-endian or non-contiguous arrays are converted (one copy) first.
    """
    code = dtype_code(a.dtype)
    if a.ndim > MAX_DIMS:
        raise ValueError(f"tensor has {a.ndim} dimensions, at most {MAX_DIMS} may travel")
    wire_dtype = DTYPES[code]
    if a.dtype != wire_dtype or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=wire_dtype)
    # reshape(-1) of a C-contiguous array is a view; it makes 0-d arrays exportable as
    # a flat byte buffer, and cast("B") gives msgpack a plain byte length.
    data = a.reshape(-1).data.cast("B")
    return {"dtype": code, "shape": list(a.shape), "data": data}


def _bad(message: str) -> WireError:
    return WireError("bad_tensor", message)


def decode_tensor(obj: object, *, max_elements: int | None = None) -> np.ndarray:
    """Validate a decoded tensor map and wrap its bytes without copying.

    Raises WireError("bad_tensor") saying exactly what was wrong.
    """
    if not isinstance(obj, dict):
        raise _bad(f"tensor must be a map, got {type(obj).__name__}")
    keys = set(obj)
    if keys != TENSOR_KEYS:
        missing = sorted(map(repr, TENSOR_KEYS - keys))
        extra = sorted(map(repr, keys - TENSOR_KEYS))
        raise _bad(f"tensor keys must be dtype, shape, data; missing {missing}, extra {extra}")
    code = obj["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise _bad(f"dtype {code!r} not allowed (allowed: {sorted(DTYPES)})")
    dtype = DTYPES[code]
    shape = obj["shape"]
    if not isinstance(shape, list):
        raise _bad(f"shape must be a list, got {type(shape).__name__}")
    if len(shape) > MAX_DIMS:
        raise _bad(f"shape has {len(shape)} dimensions, at most {MAX_DIMS} allowed")
    for dim in shape:
        # bool is an int subclass: refuse it explicitly.
        if type(dim) is not int or dim < 0:
            raise _bad(f"shape entries must be non-negative ints, got {dim!r}")
    data = obj["data"]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad(f"data must be binary, got {type(data).__name__}")
    if isinstance(data, memoryview):
        if not data.c_contiguous:
            raise _bad("data buffer is not contiguous")
        data = data.cast("B")
    # Bounding the product of the non-zero dims bounds the element count and also
    # keeps zero-size shapes like [0, 2**62, 2**62] away from numpy's overflow checks.
    ceiling = _HARD_MAX_ELEMENTS if max_elements is None else max_elements
    if math.prod(d for d in shape if d) > ceiling:
        raise _bad(f"shape {shape} is too large, element limit is {ceiling}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise _bad(
            f"shape {shape} of {code} needs {count * dtype.itemsize} bytes, data has {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def all_finite(a: np.ndarray) -> bool:
    """True when `a` holds no NaN or infinity.

    min/max propagate NaN and expose +-inf, and unlike np.isfinite(a).all() they
    allocate nothing, which matters for 10M-parameter models checked every round.
    """
    if a.size == 0 or a.dtype.kind != "f":
        return True
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))
