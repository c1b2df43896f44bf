"""What arrives on a mesh's links: read, count, decode, check, then hand on.

Every link's peer is read here: a TCP (or in-memory) link by a reader task of its own,
and all direct in-memory links by one inbox task, because 1000 in-process nodes have
8000 link ends and a task per end costs more than the messages. Whatever a link
delivers goes through `Intake.take`, which counts it, decodes it (a model-sized payload
off the event loop), checks the sender is the TLS-proven peer, and passes it to the
mesh's handler inside the supervisor's guard. A peer that keeps sending garbage or
failing messages is hung up on; nothing it sends can end more than its own link.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import trio

from p2pfl.logs import event
from p2pfl.node.link import Link, closed_cause
from p2pfl.transport.base import ConnectionClosed
from p2pfl.transport.memory import DirectConnection
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import Message

if TYPE_CHECKING:
    from p2pfl.node.mesh import Mesh

log = logging.getLogger("p2pfl.node")

MAX_BAD_MESSAGES = 20  # per connection, before we hang up on the peer
OFFLOAD_DECODE_BYTES = 1 << 20  # payloads this large are decoded in a worker thread


class Intake:
    """The reading side of one mesh's links; decoded messages go to `handle`.

    `handle(link, msg)` is the mesh's: its own messages, or the daemon's (False closes
    the link). Byte and message counts land in the mesh's peer table and totals.
    """

    def __init__(self, mesh: Mesh, handle: Callable[[Link, Message], bool]) -> None:
        self.mesh = mesh
        self.handle = handle
        # Payloads of direct in-memory links, served by one task (`_inbox_loop`).
        self._inbox: deque[tuple[Link, bytes | Exception]] = deque()
        self._inbox_wake = trio.Event()
        self._inbox_running = False

    async def read(self, link: Link) -> None:
        """A link's reader: until the peer's stream ends or `take` says stop."""
        while True:
            try:
                item: bytes | Exception = await link.conn.receive()
            except (
                ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                WireError,
            ) as exc:
                item = exc
            if not await self.take(link, item):
                return

    async def take(self, link: Link, item: bytes | Exception) -> bool:
        """One thing a link's peer sent: a payload to count, decode, check and handle,
        or the error that ends the link (EOF, a reset, bad framing). False ends the link.
        Every link's reader comes here, and so does the inbox of direct links."""
        mesh = self.mesh
        peer = link.peer_id
        if isinstance(item, WireError):
            # A framing error leaves the stream unusable: hang up on this peer only.
            mesh.count_rejection(peer, item.reason, item.detail)
            link.close_reason = f"bad framing ({item.reason})"
            return False
        if isinstance(item, Exception):
            link.close_reason = link.close_reason or closed_cause(item)
            return False
        rec = mesh.peers.peers[peer]
        n = len(item) + 4
        rec.bytes_in += n
        rec.messages_in += 1
        mesh.bytes_received += n
        try:
            msg = await self._decode(item)
        except WireError as exc:
            mesh.count_rejection(peer, exc.reason, exc.detail)
            link.bad_messages += 1
            if link.bad_messages > MAX_BAD_MESSAGES:
                log.warning(
                    "peer %s sent %d bad messages; closing",
                    peer[:12],
                    link.bad_messages,
                    extra=event("peer.closing", peer=peer, reason="bad_messages"),
                )
                return False
            return True
        if msg.sender != peer:
            mesh.count_rejection(peer, "spoofed_sender", f"claims to be {msg.sender[:12]}")
            return True
        rec.last_seen = trio.current_time()
        try:
            keep = self.handle(link, msg)
        except BaseException as exc:
            # The supervisor's guard only once something failed: entered per message,
            # it cost more than most messages' handling (docs/scenarios.md, "Scale").
            with mesh.supervisor.guard(f"message:{msg.TYPE}", peer):
                raise exc  # contained unless it is cancellation or fatal
            # The message was dropped; a peer whose messages keep failing is cut off.
            link.bad_messages += 1
            if link.bad_messages > MAX_BAD_MESSAGES:
                log.warning(
                    "peer %s: too many failed messages; closing",
                    peer[:12],
                    extra=event("peer.closing", peer=peer, reason="failed_messages"),
                )
                return False
            return True
        return keep is not False

    async def _decode(self, payload: bytes) -> Message:
        """Unpack and check one message; a model-sized one off the event loop (copying
        and checking 40 MB took the loop from heartbeats for tens of milliseconds).
        The reader awaits it, so a link's messages keep their order."""
        limits = self.mesh.limits
        if not self.mesh.offload or len(payload) < OFFLOAD_DECODE_BYTES:
            return codec.decode(payload, limits=limits)
        return await trio.to_thread.run_sync(partial(codec.decode, payload, limits=limits))

    # ---- direct in-memory links: one inbox task for all --------------------------------

    async def serve_direct(self, link: Link, conn: DirectConnection, nursery: trio.Nursery) -> None:
        """A direct in-memory link: what the peer sends goes to the one inbox task
        (`_inbox_loop`, started in `nursery` on first use), not to a reader of its own;
        this task only holds the link open until the inbox ends it (or its scope is
        cancelled)."""
        if not self._inbox_running:
            self._inbox_running = True
            nursery.start_soon(self._inbox_loop)
        conn.attach(partial(self._arrive, link))
        await link.ended.wait()

    def _arrive(self, link: Link, item: bytes | Exception) -> None:
        self._inbox.append((link, item))
        self._inbox_wake.set()

    async def _inbox_loop(self) -> None:
        """Every direct link's payloads in arrival order, each through `take` like a
        reader's: one task wakes per batch, not one reader per message."""
        while True:
            while self._inbox:
                link, item = self._inbox.popleft()
                if isinstance(item, bytes) and link.direct is not None:
                    link.direct.taken(len(item))
                if link.ended.is_set() or link.scope.cancel_called:
                    continue  # like a reader that was cancelled with payloads unread
                try:
                    keep = await self.take(link, item)
                except Exception as exc:  # contained as a reader's would be: the link ends
                    keep = False
                    with self.mesh.supervisor.guard("connection", link.peer_id):
                        raise exc  # (a guard per message would cost more than the message)
                if not keep:
                    link.ended.set()
            self._inbox_wake = trio.Event()
            await self._inbox_wake.wait()
