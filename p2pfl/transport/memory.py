"""In-process transport: the TCP transport's twin for simulations with many nodes.

A connection is two bounded trio memory channels, one per direction, carrying whole
payloads (no framing, no copies). The bound gives the same backpressure a TCP window
does: a slow reader eventually blocks its sender. `MemoryNetwork(direct=True)` makes
`DirectConnection`s instead, for simulations of many nodes: a payload is handed to the
receiving end as it is sent, with no channel and no writer task in between.

Peer ids are taken on trust (there is no handshake to prove them); the network only
checks `expected_peer_id` against the listener's declared id, which is what a test of
id pinning needs.

Of the resource bounds (`TransportLimits`) the frame limit and the inbound connection
cap apply here as over TCP; there are no partial frames, so no receive budget or frame
deadline (a payload is whole before it is handed over).
"""

from __future__ import annotations

import errno
import logging
from collections import Counter, deque
from collections.abc import Callable

import trio

from p2pfl.identity import Identity
from p2pfl.transport.base import (
    Connection,
    ConnectionClosed,
    ConnectionEnds,
    ConnectionHandler,
    HandshakeError,
    TransportLimits,
)
from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import DEFAULT_MAX_FRAME_SIZE

log = logging.getLogger("p2pfl.transport")

CHANNEL_CAPACITY = 16


class _Listener:
    __slots__ = ("handler", "nursery", "owner", "peer_id")

    def __init__(
        self,
        peer_id: str,
        handler: ConnectionHandler,
        nursery: trio.Nursery,
        owner: MemoryTransport,
    ) -> None:
        self.peer_id = peer_id
        self.handler = handler
        self.nursery = nursery
        self.owner = owner  # the listening transport: its limits and inbound count


class MemoryNetwork:
    """Registry of listening addresses ("mem:<name>") shared by the transports of a run."""

    def __init__(self, capacity: int = CHANNEL_CAPACITY, *, direct: bool = False) -> None:
        self.capacity = capacity
        self.direct = direct  # connections are DirectConnections (no channels)
        self._listeners: dict[str, _Listener] = {}

    def listening(self, address: str) -> bool:
        return address in self._listeners

    def _register(self, address: str, listener: _Listener) -> None:
        if address in self._listeners:
            raise OSError(errno.EADDRINUSE, f"{address} is already in use")
        self._listeners[address] = listener

    def _unregister(self, address: str, listener: _Listener) -> None:
        if self._listeners.get(address) is listener:
            del self._listeners[address]

    def _lookup(self, address: str) -> _Listener:
        listener = self._listeners.get(address)
        if listener is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens at {address}")
        return listener


class MemoryConnection(ConnectionEnds):
    """One end of an in-memory connection."""

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[bytes],
        receive_channel: trio.MemoryReceiveChannel[bytes],
        peer_id: str,
        remote_address: str,
        *,
        outbound: bool,
        max_frame_size: int,
    ) -> None:
        self._send = send_channel
        self._receive = receive_channel
        super().__init__(peer_id, remote_address, outbound=outbound)
        self.max_frame_size = max_frame_size

    async def send(self, payload: bytes) -> None:
        try:
            await self._send.send(bytes(payload))  # no copy for bytes; never alias a buffer
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection to {self._peer_id} is closed") from exc

    async def receive(self) -> bytes:
        try:
            payload = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection to {self._peer_id} is closed") from exc
        if len(payload) > self.max_frame_size:
            raise WireError(
                "oversize",
                f"frame of {len(payload)} bytes received, limit is {self.max_frame_size}",
            )
        return payload

    async def aclose(self) -> None:
        # Closing our send side lets the peer drain what we sent, then see EOF; closing
        # our receive side makes the peer's sends fail at once, like a reset.
        await self._send.aclose()
        await self._receive.aclose()


class DirectConnection(ConnectionEnds):
    """One end of a direct in-memory connection (`MemoryNetwork(direct=True)`).

    `send_nowait` puts a payload in the receiving end's queue at once: the sender
    needs no writer task and no channel (at 1000 in-process nodes, per-link writer tasks
    and channel hand-offs were most of the scheduling). `receive` is the same as
    MemoryConnection's: whole payloads in order, ConnectionClosed once the peer closed
    and everything it sent was read, WireError for a payload over our frame limit.
    There is no channel bound: instead `unread_bytes` (sent, not yet received by the
    peer) is what a sender's queue limit applies to (`p2pfl.node.link.Link.offer`),
    like bytes stuck in a TCP send queue to a peer that stopped reading.

    Instead of `receive`, a receiver may `attach` a callback that gets each payload (or
    the WireError/ConnectionClosed `receive` would raise) as it arrives, in order: one
    task can then serve all of a node's connections. It calls `taken` for each payload
    it has dealt with.
    """

    def __init__(
        self, peer_id: str, remote_address: str, *, outbound: bool, max_frame_size: int
    ) -> None:
        super().__init__(peer_id, remote_address, outbound=outbound)
        self.max_frame_size = max_frame_size
        self.other: DirectConnection = self  # the peer's end, set by `pair`
        self.unread_bytes = 0
        self.closed = False
        self._queue: deque[bytes] = deque()
        self._peer_closed = False
        self._arrived = trio.Event()
        self._deliver: Callable[[bytes | Exception], None] | None = None

    @staticmethod
    def pair(a: DirectConnection, b: DirectConnection) -> None:
        a.other, b.other = b, a

    def send_nowait(self, payload: bytes) -> None:
        """Hand `payload` to the peer's end; ConnectionClosed if either end closed."""
        if self.closed or self.other.closed:
            raise ConnectionClosed(f"connection to {self._peer_id} is closed")
        payload = bytes(payload)  # no copy for bytes; never alias a buffer
        self.unread_bytes += len(payload)
        self.other._arrive(payload)

    def _arrive(self, payload: bytes) -> None:
        if self._deliver is None:
            self._queue.append(payload)
            self._arrived.set()
        elif len(payload) > self.max_frame_size:
            self.taken(len(payload))
            self._deliver(self._oversize(payload))
        else:
            self._deliver(payload)

    def attach(self, deliver: Callable[[bytes | Exception], None]) -> None:
        """From now on hand every payload to `deliver` (see the class docstring)."""
        self._deliver = deliver
        while self._queue:
            self._arrive(self._queue.popleft())
        if self._peer_closed:
            deliver(ConnectionClosed(f"connection to {self._peer_id} is closed"))

    def taken(self, n: int) -> None:
        """The receiver dealt with a payload of `n` bytes: the sender's budget frees."""
        self.other.unread_bytes -= n

    def _oversize(self, payload: bytes) -> WireError:
        return WireError(
            "oversize", f"frame of {len(payload)} bytes received, limit is {self.max_frame_size}"
        )

    async def send(self, payload: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.send_nowait(payload)

    async def receive(self) -> bytes:
        while not self._queue:
            if self._peer_closed or self.closed:
                raise ConnectionClosed(f"connection to {self._peer_id} is closed")
            self._arrived = trio.Event()
            await self._arrived.wait()
        payload = self._queue.popleft()
        self.taken(len(payload))
        if len(payload) > self.max_frame_size:
            raise self._oversize(payload)
        return payload

    async def aclose(self) -> None:
        # As MemoryConnection: the peer reads what we sent, then EOF; its sends fail now.
        await trio.lowlevel.checkpoint()
        if self.closed:
            return
        self.closed = True
        self.other.unread_bytes -= sum(len(p) for p in self._queue)
        self._queue.clear()
        self._arrived.set()
        self.other._peer_closed = True
        self.other._arrived.set()
        if self.other._deliver is not None and not self.other.closed:
            peer = self.other._peer_id  # us, as the other end names us
            self.other._deliver(ConnectionClosed(f"connection to {peer} is closed"))


class MemoryTransport:
    """Transport over a MemoryNetwork; same interface as TcpTransport."""

    def __init__(
        self,
        network: MemoryNetwork,
        identity_or_peer_id: Identity | str,
        address: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        limits: TransportLimits | None = None,
    ) -> None:
        self.network = network
        self.address = address
        self.limits = limits or TransportLimits(max_frame_size=max_frame_size)
        self.events: Counter[str] = Counter()
        self.inbound = 0  # accepted connections open right now
        if isinstance(identity_or_peer_id, Identity):
            self._local_id = identity_or_peer_id.peer_id
        else:
            self._local_id = identity_or_peer_id

    @property
    def local_id(self) -> str:
        return self._local_id

    @property
    def max_frame_size(self) -> int:
        return self.limits.max_frame_size

    def set_limits(self, limits: TransportLimits) -> None:
        self.limits = limits

    async def listen(
        self,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self.network.listening(self.address):  # raise here, not wrapped in a group
            raise OSError(errno.EADDRINUSE, f"{self.address} is already in use")
        async with trio.open_nursery() as nursery:
            listener = _Listener(self._local_id, handler, nursery, self)
            self.network._register(self.address, listener)
            try:
                task_status.started([self.address])
                await trio.sleep_forever()
            finally:
                self.network._unregister(self.address, listener)

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        await trio.lowlevel.checkpoint()
        listener = self.network._lookup(address)
        if expected_peer_id is not None and listener.peer_id != expected_peer_id:
            raise HandshakeError(
                f"peer at {address} proved id {listener.peer_id}, expected {expected_peer_id}"
            )
        server = listener.owner
        if server.inbound >= server.limits.max_inbound:
            server.events["inbound_refused"] += 1
            log.warning(
                "%s refused inbound connection from %s: %d inbound connections open (max_inbound)",
                address,
                self._local_id[:12],
                server.inbound,
            )
            raise HandshakeError(
                f"peer {listener.peer_id} at {address} refused us: "
                "it has as many inbound connections as it accepts (max_inbound)"
            )
        server.inbound += 1
        if self.network.direct:
            mine = DirectConnection(
                listener.peer_id, address, outbound=True, max_frame_size=self.max_frame_size
            )
            other = DirectConnection(
                self._local_id,
                self.address,
                outbound=False,
                max_frame_size=server.max_frame_size,
            )
            DirectConnection.pair(mine, other)
            listener.nursery.start_soon(_run_handler, listener.handler, other, server)
            return mine
        out_send, out_receive = trio.open_memory_channel[bytes](self.network.capacity)
        in_send, in_receive = trio.open_memory_channel[bytes](self.network.capacity)
        ours = MemoryConnection(
            out_send,
            in_receive,
            listener.peer_id,
            address,
            outbound=True,
            max_frame_size=self.max_frame_size,
        )
        theirs = MemoryConnection(
            in_send,
            out_receive,
            self._local_id,
            self.address,
            outbound=False,
            max_frame_size=server.max_frame_size,
        )
        listener.nursery.start_soon(_run_handler, listener.handler, theirs, server)
        return ours


async def _run_handler(
    handler: ConnectionHandler, conn: MemoryConnection | DirectConnection, server: MemoryTransport
) -> None:
    """Mirror TcpTransport: a closed or misbehaving peer ends only its own connection."""
    try:
        await handler(conn)
    except ConnectionClosed as exc:
        log.debug("connection from %s ended: %s", conn.peer_id, exc)
    except WireError as exc:
        log.warning("bad frame from %s, closing: %s", conn.peer_id, exc)
    finally:
        server.inbound -= 1
        await conn.aclose()
