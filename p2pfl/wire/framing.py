"""Length-prefixed framing (sans-IO).

A frame is a 4-byte big-endian payload length followed by the payload. The limit is
checked as soon as the 4 header bytes arrive, so an oversized frame is refused before
a single payload byte is buffered. The limit a node uses is derived from its model
(`frame_limit_for`): a peer must not make a node with a 2.6 KB model buffer 256 MiB.
"""

from __future__ import annotations

import struct
from collections import deque

from p2pfl.wire.errors import WireError

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024
MAX_FRAME_SIZE = 2**32 - 1  # what a 4-byte header can announce
# Room for everything in a frame that is not the model vector: message headers, tensor
# maps, and the largest message with no vector at all. That is a secure-aggregation
# group announcement at its validated maximum (1024 participants x (32-char id +
# 137-byte signed key) + groups, ~180 KB); a peer list (256 x (id + 256-char address),
# ~100 KB) and a hello (16 addresses) are smaller. tests/test_resource_bounds.py encodes
# each of them at its maximum and checks it fits.
FRAME_HEADROOM = 512 * 1024
# Fed chunks below this size are merged into one bytearray, so a peer trickling single
# bytes cannot make us hold one Python object (~35 bytes of overhead) per byte.
COALESCE_BELOW = 64 * 1024


def frame_limit_for(num_params: int) -> int:
    """The default frame limit for a model of `num_params` float32 parameters.

    Twice the dense update (4 bytes x num_params x 2) plus FRAME_HEADROOM. The largest
    legitimate frames carry one vector: a model update or state reply (float32, 4 bytes a
    parameter), a masked secure update (uint32, 4 bytes) or a compressed update (at most
    ~5 bytes a parameter: 1-byte gaps + float32 values at top-k 100%). Twice the dense
    size leaves a margin for all of them without letting a peer announce 100x the model.
    """
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    return min(MAX_FRAME_SIZE, 2 * 4 * num_params + FRAME_HEADROOM)


def frame_deadline(length: int, *, floor: float, min_rate: float) -> float:
    """Seconds a frame of `length` bytes may take once its header is in: a floor plus
    its size at the slowest rate we accept. A peer that announces a frame and then
    trickles it (slowloris on one frame) loses the connection instead of pinning a
    buffer and a share of the receive budget for as long as it likes."""
    return floor + length / min_rate


def frame_header(payload_length: int) -> bytes:
    return HEADER.pack(payload_length)


def frame(payload: bytes) -> bytes:
    """Return header + payload as one buffer (copies; use frame_header for big payloads)."""
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Feed it bytes as they arrive; take complete payloads out.

    Large fed chunks are kept as they are (bytes are immutable, so no copy) and joined
    once when their frame completes: a big payload is copied exactly once, which is
    what decides throughput for 40 MB models.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        # Unconsumed input; only the last entry may be a (coalescing) bytearray, and
        # no memoryview of a bytearray outlives a method call, so it can still grow.
        self._chunks: deque[bytes | bytearray] = deque()
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._size = 0  # unconsumed bytes in total
        self._need: int | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if n == 0:
            return
        if n < COALESCE_BELOW:
            tail = self._chunks[-1] if self._chunks else None
            if type(tail) is bytearray and len(tail) < COALESCE_BELOW:
                tail += data
            else:
                self._chunks.append(bytearray(data))
        else:
            # The caller may reuse a mutable buffer: only bytes can be kept uncopied.
            self._chunks.append(data if type(data) is bytes else bytes(data))
        self._size += n

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def pending_length(self) -> int | None:
        """Payload length announced by the header of the frame in progress (None until
        a header has been parsed by `next_frame`)."""
        return self._need

    def clear(self) -> None:
        """Drop everything buffered (the connection is gone): nothing stays pinned."""
        self._chunks.clear()
        self._offset = 0
        self._size = 0
        self._need = None

    def wants(self) -> int:
        """How many more bytes are needed before the next frame can complete."""
        if self._need is None:
            return max(HEADER.size - self._size, 1)
        return max(HEADER.size + self._need - self._size, 1)

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None if more bytes are needed.

        Raises WireError("oversize") when a header announces a frame above the limit.
        """
        if self._need is None:
            if self._size < HEADER.size:
                return None
            (length,) = HEADER.unpack(self._take(HEADER.size, consume=False))
            if length > self.max_frame_size:
                raise WireError(
                    "oversize",
                    f"frame of {length} bytes announced, limit is {self.max_frame_size}",
                )
            self._need = length
        if self._size < HEADER.size + self._need:
            return None
        self._advance(HEADER.size)
        payload = self._take(self._need, consume=True)
        self._need = None
        return payload

    def _take(self, n: int, *, consume: bool) -> bytes:
        """The next n buffered bytes as one bytes object (copied once, or not at all)."""
        if n == 0:
            return b""
        front = self._chunks[0]
        start = self._offset
        if start == 0 and len(front) == n and type(front) is bytes:
            payload = front  # a chunk that is exactly the payload: no copy
        elif len(front) - start >= n:
            with memoryview(front) as view:
                payload = bytes(view[start : start + n])
        else:
            views: list[memoryview] = []
            try:
                remaining = n
                for chunk in self._chunks:
                    view = memoryview(chunk)
                    views.append(view)
                    piece = view[start : start + remaining]
                    views.append(piece)
                    remaining -= len(piece)
                    start = 0
                    if remaining == 0:
                        break
                payload = b"".join(views[1::2])
            finally:
                for view in reversed(views):
                    view.release()
        if consume:
            self._advance(n)
        return payload

    def _advance(self, n: int) -> None:
        self._size -= n
        while n:
            front = self._chunks[0]
            available = len(front) - self._offset
            if n < available:
                self._offset += n
                return
            n -= available
            self._chunks.popleft()
            self._offset = 0
