"""Length-prefixed framing (sans-IO).

A frame is a 4-byte big-endian payload length followed by the payload. The limit is
checked as soon as the 4 header bytes arrive, so an oversized frame is refused before
a single payload byte is buffered.
"""

from __future__ import annotations

import struct

from p2pfl.wire.errors import WireError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024


def frame_header(payload_length: int) -> bytes:
    return HEADER.pack(payload_length)


def frame(payload: bytes) -> bytes:
    """Return header + payload as one buffer (copies; use frame_header for big payloads)."""
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Feed it bytes as they arrive; take complete payloads out."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._need: int | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def wants(self) -> int:
        """How many more bytes are needed before the next frame can complete."""
        if self._need is None:
            return max(HEADER.size - len(self._buf), 1)
        return max(HEADER.size + self._need - len(self._buf), 1)

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None if more bytes are needed.

        Raises WireError("oversize") when a header announces a frame above the limit.
        """
        if self._need is None:
            if len(self._buf) < HEADER.size:
                return None
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame_size:
                raise WireError(
                    "oversize",
                    f"frame of {length} bytes announced, limit is {self.max_frame_size}",
                )
            self._need = length
        end = HEADER.size + self._need
        if len(self._buf) < end:
            return None
        # Slicing the bytearray would copy twice (slice, then bytes); a memoryview slice
        # copies once. Released before the del below, which needs an unexported buffer.
        with memoryview(self._buf) as view:
            payload = bytes(view[HEADER.size : end])
        del self._buf[:end]
        self._need = None
        return payload
