"""Length-prefixed framing (sans-IO).

A frame is a 4-byte big-endian header followed by the payload: the low 30 bits are the
payload length, the top 2 bits say which part of a message the frame carries (`Part`).
A message above `PART_SIZE` travels as parts (FIRST, MORE..., LAST), and the FIRST
part's header also carries the whole message's length, so a receiver can refuse or
budget the message before any byte of it is buffered. Single-frame messages may come
between the parts of another: that is what lets a heartbeat overtake a 40 MB update
already on the wire, instead of waiting for all of it. The limit is checked as soon
as a header arrives. The limit a node uses is derived from its model
(`frame_limit_for`): a peer must not make a node with a 2.6 KB model buffer 256 MiB.
"""

from __future__ import annotations

import struct
from collections import deque
from enum import IntEnum

from p2pfl.wire.errors import WireError

HEADER = struct.Struct(">I")
TOTAL = struct.Struct(">I")  # after a FIRST part's header: the whole message's length
DEFAULT_MAX_FRAME_SIZE = 256 * 1024 * 1024
MAX_FRAME_SIZE = 2**32 - 1  # the largest message a FIRST header can announce
LENGTH_MASK = (1 << 30) - 1  # a frame's own payload length: the header's low 30 bits
PART_SIZE = 1024 * 1024  # messages above this go out as parts of this size


class Part(IntEnum):
    """The header's top two bits."""

    WHOLE = 0  # a message in one frame
    FIRST = 1  # the first part; its header is followed by the message's total length
    MORE = 2  # a middle part
    LAST = 3  # the final part


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


def frame_header(payload_length: int, part: Part = Part.WHOLE, total: int = 0) -> bytes:
    """The header of a frame with `payload_length` bytes (a FIRST part's with `total`)."""
    head = HEADER.pack(part << 30 | payload_length)
    return head + TOTAL.pack(total) if part is Part.FIRST else head


def frame_header_size(part: Part) -> int:
    """Bytes of a frame header: a FIRST part's carries the message length too."""
    return HEADER.size + (TOTAL.size if part is Part.FIRST else 0)


def frame(payload: bytes) -> bytes:
    """Return header + payload as one buffer (copies; use frame_header for big payloads)."""
    return HEADER.pack(len(payload)) + payload


def split_parts(length: int, part_size: int = PART_SIZE) -> list[tuple[Part, int, int]]:
    """(part, start, end) of each frame a `length`-byte message travels in."""
    if length <= part_size:
        return [(Part.WHOLE, 0, length)]
    starts = range(0, length, part_size)
    last = len(starts) - 1
    return [
        (
            Part.FIRST if i == 0 else Part.LAST if i == last else Part.MORE,
            start,
            min(start + part_size, length),
        )
        for i, start in enumerate(starts)
    ]


class PartAssembler:
    """Joins the parts of one message at a time; whole messages pass straight through.

    `expect` checks a frame's header before its body is read, so a peer cannot make us
    buffer a part that breaks the rules (a second FIRST, a continuation out of nowhere,
    more bytes than announced).
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._got = 0
        self._total: int | None = None

    @property
    def in_progress(self) -> bool:
        return self._total is not None

    @property
    def held(self) -> int:
        return self._got

    def expect(self, part: Part, length: int, total: int) -> None:
        if part is Part.WHOLE:
            return
        if part is Part.FIRST:
            if self._total is not None:
                raise WireError("bad_part", "a new message began inside another's parts")
            if length > total:
                raise WireError("bad_part", f"first part of {length} bytes of {total}")
            return
        if self._total is None:
            raise WireError("bad_part", "a continuation part without a first part")
        got = self._got + length
        if got > self._total or (part is Part.LAST and got != self._total):
            raise WireError("bad_part", f"parts of {got} bytes for a {self._total}-byte message")

    def add(self, part: Part, payload: bytes, total: int = 0) -> bytes | None:
        """The complete message this frame ends, or None while parts are missing."""
        if part is Part.WHOLE:
            return payload
        if part is Part.FIRST:
            self._total = total
        self._parts.append(payload)
        self._got += len(payload)
        if part is not Part.LAST:
            return None
        message = b"".join(self._parts)
        self.clear()
        return message

    def clear(self) -> None:
        self._parts = []
        self._got = 0
        self._total = None


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
        self._head = HEADER.size  # bytes of the pending frame's header
        self.pending_part = Part.WHOLE  # of the frame whose header was parsed
        self.pending_total = 0  # a FIRST part's message length
        self.part = Part.WHOLE  # of the frame `next_frame` returned last
        self.total = 0

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
            head = HEADER.size
            if self._size >= HEADER.size:
                (word,) = HEADER.unpack(self._take(HEADER.size, consume=False))
                head += TOTAL.size if word >> 30 == Part.FIRST else 0
            return max(head - self._size, 1)
        return max(self._head + self._need - self._size, 1)

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None if more bytes are needed.

        Raises WireError("oversize") when a header announces a frame above the limit.
        """
        if self._need is None:
            if self._size < HEADER.size:
                return None
            (word,) = HEADER.unpack(self._take(HEADER.size, consume=False))
            part, length = Part(word >> 30), word & LENGTH_MASK
            total = 0
            if part is Part.FIRST:
                if self._size < HEADER.size + TOTAL.size:
                    return None
                (total,) = TOTAL.unpack(self._take(HEADER.size + TOTAL.size, consume=False)[4:])
            if max(length, total) > self.max_frame_size:
                what = "message" if part is Part.FIRST else "frame"
                raise WireError(
                    "oversize",
                    f"{what} of {max(length, total)} bytes announced, "
                    f"limit is {self.max_frame_size}",
                )
            self._need = length
            self._head = HEADER.size + (TOTAL.size if part is Part.FIRST else 0)
            self.pending_part, self.pending_total = part, total
        if self._size < self._head + self._need:
            return None
        self._advance(self._head)
        payload = self._take(self._need, consume=True)
        self._need = None
        self.part, self.total = self.pending_part, self.pending_total
        return payload

    def detach_body(self) -> tuple[bytearray, int]:
        """Hand over the body of the frame whose header was parsed: the caller reads the
        rest of it straight into the returned buffer (no chunk lists, no joins).

        Returns (a buffer of the announced length, how many of its bytes were already
        buffered here and are filled in). The header is consumed and the frame counts as
        returned by `next_frame`: `part` and `total` describe it. Only with
        `pending_length` set, that is after the header was checked against the limit.
        """
        if self._need is None:
            raise RuntimeError("detach_body before a header was parsed")
        need = self._need
        self._advance(self._head)
        have = min(self._size, need)
        body = bytearray(need)
        if have:
            body[:have] = self._take(have, consume=True)
        self._need = None
        self.part, self.total = self.pending_part, self.pending_total
        return body, have

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
