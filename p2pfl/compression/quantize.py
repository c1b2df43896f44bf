"""Value encodings: float32, float16, and int8/int4 with one scale per block.

`encode_values` returns the bytes to send *and* the values the receiver will decode
from them, computed by the same `_dequantize` the receiver runs: the sender updates
its public copy x_hat with exactly the numbers every receiver adds to its own, so the
copies never drift apart by a rounding difference.

Linear int quantization: per block of QUANT_BLOCK values, scale = max|v| / L with
L = 127 (int8) or 7 (int4) and q = round(v / scale) in [-L, L]; decoding is q * scale.
Round-to-nearest errs by at most scale / 2 per value; stochastic rounding
(floor(v / scale + U[0, 1))) errs by less than one scale but is unbiased, which
matters when errors are not fed back. int4 packs two values per byte (low nibble
first) as q + 8, so nibble 0 (= -8) never occurs and is refused.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from p2pfl.compression.pipeline import QUANT_BLOCK, Quantize
from p2pfl.wire.errors import WireError
from p2pfl.wire.tensors import all_finite

F32 = npt.NDArray[np.float32]
F16_MAX = float(np.finfo(np.float16).max)


def _blocks(count: int) -> int:
    return -(-count // QUANT_BLOCK)


def values_size(count: int, quant: Quantize | None) -> int:
    """Bytes that `count` values occupy on the wire (scales included)."""
    if quant is None:
        return 4 * count
    if quant.bits == 16:
        return 2 * count
    scales = 4 * _blocks(count)
    return scales + (count if quant.bits == 8 else (count + 1) // 2)


def _padded(v: F32) -> F32:
    """v as a (blocks, QUANT_BLOCK) matrix, zero-padded."""
    out = np.zeros(_blocks(v.size) * QUANT_BLOCK, dtype=np.float32)
    out[: v.size] = v
    return out.reshape(-1, QUANT_BLOCK)


def _dequantize(q: npt.NDArray[np.int8], scales: F32, count: int) -> F32:
    """q * scale per block; the one implementation both ends use."""
    full = np.zeros(scales.size * QUANT_BLOCK, dtype=np.int8)
    full[:count] = q
    out: F32 = full.reshape(-1, QUANT_BLOCK).astype(np.float32)
    with np.errstate(over="ignore"):  # a hostile scale may overflow; the caller checks
        out *= scales[:, None]
    return out.reshape(-1)[:count]


def _quantize_int(v: F32, quant: Quantize, rng: np.random.Generator) -> tuple[bytes, F32]:
    levels = quant.levels
    blocks = _padded(v)
    scales = (np.abs(blocks).max(axis=1) / np.float32(levels)).astype(np.float32)
    # Divide rather than multiply by 1/scale: 1/scale overflows for subnormal scales.
    x = np.zeros_like(blocks)
    np.divide(blocks, scales[:, None], out=x, where=scales[:, None] > 0)
    if quant.stochastic:
        x += rng.random(x.shape, dtype=np.float32)
        np.floor(x, out=x)
    else:
        np.rint(x, out=x)
    np.clip(x, -levels, levels, out=x)
    q = x.reshape(-1)[: v.size].astype(np.int8)
    if quant.bits == 8:
        packed = q.tobytes()
    else:
        nibbles = (q + 8).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    return scales.tobytes() + packed, _dequantize(q, scales, v.size)


def encode_values(v: F32, quant: Quantize | None, rng: np.random.Generator) -> tuple[bytes, F32]:
    """(wire bytes, the values a receiver decodes from them) for finite float32 `v`."""
    if quant is None:
        return v.astype("<f4", copy=False).tobytes(), v.copy()
    if quant.bits == 16:
        half = np.clip(v, -F16_MAX, F16_MAX).astype("<f2")
        return half.tobytes(), half.astype(np.float32)
    return _quantize_int(v, quant, rng)


def _bad(message: str) -> WireError:
    return WireError("bad_compression", message)


def decode_values(data: memoryview, count: int, quant: Quantize | None) -> F32:
    """Inverse of encode_values; `data` must hold exactly values_size(count, quant) bytes.

    Raises WireError("bad_compression") for non-finite floats or scales and for int
    codes the encoder never produces.
    """
    if quant is None or quant.bits == 16:
        dtype = "<f4" if quant is None else "<f2"
        values = np.frombuffer(data, dtype=dtype, count=count).astype(np.float32)
        if not all_finite(values):
            raise _bad("values contain NaN or infinity")
        return values
    nb = _blocks(count)
    scales = np.frombuffer(data, dtype="<f4", count=nb).astype(np.float32)
    if not all_finite(scales) or (nb and scales.min() < 0):
        raise _bad("quantization scales must be finite and non-negative")
    body = data[4 * nb :]
    if quant.bits == 8:
        q = np.frombuffer(body, dtype=np.int8, count=count)
        if count and q.min() < -quant.levels:
            raise _bad("int8 code -128 is not produced by the encoder")
    else:
        packed = np.frombuffer(body, dtype=np.uint8, count=(count + 1) // 2)
        nibbles = np.empty(packed.size * 2, dtype=np.uint8)
        nibbles[0::2] = packed & 0x0F
        nibbles[1::2] = packed >> 4
        if nibbles.size and nibbles.min() == 0:
            raise _bad("int4 code -8 is not produced by the encoder")
        if count % 2 and nibbles[-1] != 8:
            raise _bad("int4 padding nibble must be zero")
        q = (nibbles[:count].astype(np.int16) - 8).astype(np.int8)
    values = _dequantize(q, scales, count)
    if not all_finite(values):
        raise _bad("dequantized values overflow float32")
    return values
