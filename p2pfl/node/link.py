"""One live connection to a peer and its outbound queue.

Callers never block on a slow peer: `offer` queues a message or refuses it when the
queue is over its byte budget (the peer stops reading, we stop holding memory for it),
and a single writer task (`pump`) drains the queue onto the connection. Heartbeats
(`urgent`) go in a lane of their own with its own writer: a Pong never waits behind
queued 40 MB model updates, and on TCP not even behind the one being written, whose
parts it slips between (see p2pfl/wire/framing.py). The link also
remembers where each recent round's model update sits in that queue, so that a resend
request for an update still waiting to be written is recognised as such: the update is
on its way, and resending it would only duplicate the transfer.

On a direct in-memory connection (`p2pfl.transport.memory.DirectConnection`, in-process
scenarios) there is no queue and no writer: `offer` hands the payload to the peer's end
at once, under the same byte budget, counted against what the peer has not yet read.
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from p2pfl.membership import PeerState
from p2pfl.transport.base import Connection, ConnectionClosed
from p2pfl.transport.memory import DirectConnection

UPDATE_ROUNDS_KEPT = 3
"""Recent rounds whose update position a link remembers (senders resend the last two)."""


@dataclass(eq=False)
class Link:
    conn: Connection
    peer_id: str
    found_via: str
    queued_bytes: int = 0
    bad_messages: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed_state: PeerState = PeerState.DISCONNECTED
    retired: bool = False  # a duplicate being wound down: read, never written
    last_drop_logged: float = -math.inf
    last_state_reply: float = -math.inf
    enqueued: int = 0  # messages ever queued on this link (not counting urgent ones)
    written: int = 0  # of those, handed to the connection
    # Every message accepted for the peer, heartbeats included, and that count at our
    # last heartbeat: a link we sent anything on since needs no ping for the peer to
    # know we are alive (`Mesh._heartbeat`).
    offers: int = 0
    offers_at_beat: int = 0
    pinged_at_beat: int = 0  # the heartbeat that last pinged the peer on this link
    # Why the connection ended, when it ended by itself (EOF, reset, bad framing, a
    # heartbeat timeout); None while open or when we closed it (shutdown, duplicate).
    close_reason: str | None = None
    # `writing` counts the lanes inside a send (one stays counted if its send was cut
    # short, leaving half a frame on the wire); `closing` stops both writers before
    # their next message.
    writing: int = 0
    closing: bool = False
    _update_at: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.direct = self.conn if isinstance(self.conn, DirectConnection) else None
        self.ended = trio.Event()  # a direct link's inbox is done with it (`Mesh._take`)
        self._on_written: Callable[[int], None] | None = None
        self._unreported = 0  # bytes written directly before `pump` gave its callback
        self._normal: deque[bytes] = deque()
        self._urgent: deque[bytes] = deque()
        self._wake = {True: trio.Event(), False: trio.Event()}  # by lane: urgent or not

    def offer(self, payload: bytes, limit: float, *, urgent: bool = False) -> bool:
        """Queue `payload` unless the queue would exceed `limit` bytes; `urgent`
        messages (heartbeats) are written before everything queued normally."""
        if self.direct is not None:
            return self._write_now(self.direct, payload, limit, urgent)
        if self.queued_bytes + len(payload) > limit:
            return False
        self.queued_bytes += len(payload)
        self.offers += 1
        if urgent:
            self._urgent.append(payload)
        else:
            self.enqueued += 1
            self._normal.append(payload)
        self._wake[urgent].set()
        return True

    def _write_now(
        self, conn: DirectConnection, payload: bytes, limit: float, urgent: bool
    ) -> bool:
        """`offer` on a direct connection: written at once (the peer's unread bytes are
        the queue); like a queued message, one that fails closes the link."""
        if conn.unread_bytes + len(payload) > limit:
            return False
        if not urgent:
            self.enqueued += 1
        if self.closing:  # behind our Bye: never written, as on a queue
            return True
        self.offers += 1
        try:
            conn.send_nowait(payload)
        except ConnectionClosed as exc:
            if self.close_reason is None:
                self.close_reason = closed_cause(exc)
            self.scope.cancel()
            return True
        if not urgent:
            self.written += 1
        if self._on_written is None:
            self._unreported += len(payload) + 4
        else:
            self._on_written(len(payload) + 4)
        return True

    def update_queued(self, round: int) -> None:
        """The message just offered is our model update for `round`."""
        self._update_at[round] = self.enqueued
        for old in [r for r in self._update_at if r <= round - UPDATE_ROUNDS_KEPT]:
            del self._update_at[old]

    def update_in_flight(self, round: int) -> bool:
        """Our update for `round` is queued here and not yet written."""
        return self.written < self._update_at.get(round, 0)

    def any_update_in_flight(self) -> bool:
        """Some update of ours is queued here and not yet written: in the asynchronous
        mode a peer gets our next model only once the last one is on its way, so a fast
        node never queues up models a slow link cannot carry."""
        return self.written < max(self._update_at.values(), default=0)

    def move_unsent_to(self, successor: Link) -> None:
        """Hand every message not yet written to `successor` (a duplicate connection is
        being replaced): nothing queued is lost in the swap."""
        for lane, urgent in ((self._urgent, True), (self._normal, False)):
            while lane:
                payload = lane.popleft()
                self.queued_bytes -= len(payload)
                successor.offer(payload, limit=math.inf, urgent=urgent)

    async def flush(self, *, grace: float = 1.0) -> bool:
        """Wait until what is queued now has been written (at most `grace` seconds).

        For a link we close ourselves right after reading the peer's first message: our
        Hello was queued at connect, and the peer must read it to learn why we close.
        """
        target = self.enqueued
        with trio.move_on_after(grace):
            while self.written < target and not self.scope.cancel_called:
                await trio.sleep(0.01)
        return self.written >= target

    async def say_bye(self, payload: bytes, *, grace: float = 0.5) -> bool:
        """Write a last message (our Bye) and stop the writer; True if it was written.

        Never into the middle of the writer's frame (the peer would read the rest as a
        bogus length): the writer stops before its next message, a frame in progress
        gets `grace` seconds to finish, and the Bye goes out only on a frame boundary.
        """
        self.closing = True
        with trio.move_on_after(grace):
            while self.writing and not self.scope.cancel_called:
                await trio.sleep(0.01)
        if self.writing:
            return False
        try:
            with trio.move_on_after(grace):
                await self.conn.send(payload)
                return True
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        return False

    async def pump(self, on_written: Callable[[int], None]) -> None:
        """Write queued messages until the connection fails (then cancel the link) or
        the link closes: one writer per lane, so heartbeats never queue behind updates.
        A direct link has nothing to pump: it only takes the byte counter."""
        if self.direct is not None:
            self._on_written = on_written
            if self._unreported:
                on_written(self._unreported)
                self._unreported = 0
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_lane, True, on_written)
            await self._pump_lane(False, on_written)
            nursery.cancel_scope.cancel()

    async def _pump_lane(self, urgent: bool, on_written: Callable[[int], None]) -> None:
        lane = self._urgent if urgent else self._normal
        while True:
            if not lane:
                self._wake[urgent] = trio.Event()
                await self._wake[urgent].wait()
                continue
            if self.closing:
                return
            payload = lane.popleft()
            self.queued_bytes -= len(payload)
            self.writing += 1
            try:
                await self.conn.send(payload)
            except (
                ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ) as exc:
                if self.close_reason is None:
                    self.close_reason = closed_cause(exc)
                self.scope.cancel()
                return
            self.writing -= 1
            if not urgent:
                self.written += 1
            on_written(len(payload) + 4)


def closed_cause(exc: BaseException) -> str:
    """A short cause for the lost-peer log line: "EOF" when the peer closed the stream
    (a process exit, SIGKILL included), else "connection reset (...)"."""
    cause = exc.__cause__ if isinstance(exc, ConnectionClosed) else exc
    if cause is None or isinstance(cause, trio.EndOfChannel):
        return "EOF"
    if isinstance(cause, trio.ClosedResourceError):
        return "connection closed"
    inner = cause.__cause__ or cause.__context__ or cause
    if isinstance(inner, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "EOF"  # TLS closed, with or without close_notify (a killed process sends none)
    return f"connection reset ({type(inner).__name__})"
