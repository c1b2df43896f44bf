"""zstd as the last stage, with the decompressed size fixed before anything is inflated.

A zstd frame can claim any content size and expand a few bytes into gigabytes. The
receiver already knows exactly how many bytes the message must inflate to (from the
stage list and the value count), so it reads the size the frame header declares,
refuses anything above the frame limit as a bomb and anything else that differs from
the expected size as malformed, and only then decompresses into a buffer of exactly
that size. python-zstandard sizes its output from the header when the header has a
size (ignoring `max_output_size`), which is why the header check must come first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pfl.wire.errors import WireError

if TYPE_CHECKING:
    import zstandard


def compressor(level: int) -> zstandard.ZstdCompressor:
    """A reusable compressor that always records the content size in the frame header."""
    # zstandard is imported on first use, here and below: every node can decode a
    # peer's compressed update, but a node whose peers never send zstd frames does
    # not load the codec (docs/architecture.md, "Node footprint").
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)


def decompress_exact(data: bytes, expected: int, limit: int) -> bytes:
    """Inflate one zstd frame that must hold exactly `expected` bytes (<= `limit`).

    WireError("decompression_bomb") if the header declares more than `limit`;
    WireError("bad_compression") for anything else wrong (no declared size, size
    other than expected, corrupt data, trailing bytes after the frame).
    """
    import zstandard

    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise WireError("bad_compression", f"not a zstd frame ({exc})") from None
    if declared < 0:
        raise WireError("bad_compression", "zstd frame does not declare its content size")
    if declared > limit:
        raise WireError(
            "decompression_bomb", f"zstd frame declares {declared} bytes, limit is {limit}"
        )
    if declared != expected:
        raise WireError(
            "bad_compression", f"zstd frame declares {declared} bytes, message needs {expected}"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise WireError("bad_compression", f"corrupt zstd frame ({exc})") from None
    if len(out) != expected:  # pragma: no cover - libzstd enforces the declared size
        raise WireError("bad_compression", f"zstd frame inflated to {len(out)} bytes")
    return out
