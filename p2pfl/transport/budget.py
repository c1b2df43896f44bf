"""One receive budget shared by every connection of a transport.

Why: each link holds at most one partial frame (at most `max_frame_size` bytes), but a
node accepts many links, and admitted peers (anyone, in an open federation) can each
announce a frame and send most of it. Before a frame's body is read, its announced size
is reserved here; while the budget is spent, further frames wait in FIFO order (their
senders are held back by TCP flow control) and their wait is bounded by the caller.
The budget never goes above its capacity, and every reservation is returned when its
frame completes or its connection ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

# A dropped partial frame is freed, but glibc keeps freed heap pages that are not at the
# top of the heap: four peers that each sent 120 MiB of a frame left the node 220 MiB
# larger after they closed. `malloc_trim(0)` hands those pages back; it is called only
# when a connection drops at least this much (a frame that completes is passed on, and
# its memory is reused by the next one).
TRIM_ABOVE = 1024 * 1024


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None
    return trim


_malloc_trim = _find_malloc_trim()


def give_back_memory(dropped: int) -> bool:
    """After `dropped` bytes of partial frames were freed: return free heap pages to the
    OS if that was a lot (glibc only). True if it trimmed."""
    return dropped >= TRIM_ABOVE and trim_heap()


def trim_heap() -> bool:
    """Return free heap pages to the OS now (glibc only; a few milliseconds, so from a
    worker thread). A long-running node frees and reallocates model-sized buffers and
    TLS state all the time; without this, glibc keeps the freed pages and the RSS of a
    node under churn creeps up by megabytes that are not in use (measured: 5 MB)."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


@dataclass(eq=False)
class _Waiter:
    size: int
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False


class ReceiveBudget:
    """Bytes of partially received frames, across all links, at most `capacity`."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"receive budget must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # the most ever reserved at once (tests, status)
        self.waits = 0  # reservations that had to wait for their turn
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, capacity: int) -> None:
        """A new capacity for reservations from now on (the node sizes it to its model)."""
        if capacity < 1:
            raise ValueError(f"receive budget must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self._grant()

    def try_reserve(self, size: int) -> bool:
        """Reserve at once if that fits and nobody is queued ahead; never waits."""
        self._check(size)
        if self._waiters or self.used + size > self.capacity:
            return False
        self._take(size)
        return True

    async def reserve(self, size: int) -> None:
        """Reserve `size` bytes, waiting behind earlier requests (FIFO, so a big frame
        is not starved by a stream of small ones). Bound the wait with a cancel scope;
        a cancelled wait leaves nothing reserved."""
        if self.try_reserve(size):
            await trio.lowlevel.checkpoint()
            return
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        self.waits += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release(size)
            else:
                self._waiters.remove(waiter)
                self._grant()  # the head may have left: later ones may fit now
            raise

    def release(self, size: int) -> None:
        if not 0 <= size <= self.used:
            raise ValueError(f"releasing {size} bytes, only {self.used} reserved")
        self.used -= size
        self._grant()

    def _check(self, size: int) -> None:
        if not 0 <= size <= self.capacity:
            raise ValueError(f"cannot reserve {size} bytes of a {self.capacity}-byte budget")

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0].size <= self.capacity:
            waiter = self._waiters.popleft()
            self._take(waiter.size)
            waiter.granted = True
            waiter.event.set()

    def snapshot(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "used": self.used,
            "peak": self.peak,
            "waiting": self.waiting,
            "waits": self.waits,
        }
