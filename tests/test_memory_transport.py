from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from p2pfl.identity import Identity
from p2pfl.transport.base import Connection, ConnectionClosed, HandshakeError, Transport
from p2pfl.transport.memory import CHANNEL_CAPACITY, MemoryNetwork, MemoryTransport
from p2pfl.wire.errors import WireError


class Recorder:
    """Handler that keeps the server-side connections and echoes until the peer leaves."""

    def __init__(self) -> None:
        self.conns: list[Connection] = []
        self.ended: list[str] = []

    async def __call__(self, conn: Connection) -> None:
        self.conns.append(conn)
        try:
            while True:
                await conn.send(await conn.receive())
        finally:
            self.ended.append(conn.peer_id)


@pytest.mark.parametrize("direct", [False, True])
async def test_round_trip_and_ids(direct: bool) -> None:
    net = MemoryNetwork(direct=direct)
    a = MemoryTransport(net, Identity.from_seed(b"\x01" * 32), "mem:a")
    b = MemoryTransport(net, "peer-b", "mem:b")
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        assert await nursery.start(a.listen, rec) == ["mem:a"]
        conn = await b.connect("mem:a", expected_peer_id=a.local_id)
        assert conn.peer_id == a.local_id and conn.outbound
        assert conn.remote_address == "mem:a"
        for payload in [b"x", b"", b"y" * 100_000]:
            await conn.send(payload)
            assert await conn.receive() == payload
        (server_side,) = rec.conns
        assert server_side.peer_id == "peer-b" and not server_side.outbound
        assert server_side.remote_address == "mem:b"
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_unknown_address_and_mismatch() -> None:
    net = MemoryNetwork()
    a = MemoryTransport(net, "peer-a", "mem:a")
    b = MemoryTransport(net, "peer-b", "mem:b")
    with pytest.raises(OSError, match="mem:a"):
        await b.connect("mem:a")
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(a.listen, rec)
        with pytest.raises(HandshakeError, match="proved id peer-a, expected peer-c"):
            await b.connect("mem:a", expected_peer_id="peer-c")
        await trio.testing.wait_all_tasks_blocked()
        assert rec.conns == []
        with pytest.raises(OSError):
            await nursery.start(MemoryTransport(net, "peer-x", "mem:a").listen, rec)
        nursery.cancel_scope.cancel()
    # The listener is gone once its task ends.
    assert not net.listening("mem:a")
    with pytest.raises(OSError):
        await b.connect("mem:a")


@pytest.mark.parametrize("direct", [False, True])
async def test_close_semantics(direct: bool) -> None:
    net = MemoryNetwork(direct=direct)
    a = MemoryTransport(net, "peer-a", "mem:a")
    b = MemoryTransport(net, "peer-b", "mem:b")
    server_conns: list[Connection] = []
    release = trio.Event()

    async def hold(conn: Connection) -> None:
        server_conns.append(conn)
        await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(a.listen, hold)
        conn = await b.connect("mem:a")
        await trio.testing.wait_all_tasks_blocked()
        (server,) = server_conns
        await conn.send(b"sent before close")
        await conn.aclose()
        await conn.aclose()  # idempotent
        # Data sent before the close is still delivered, then EOF.
        assert await server.receive() == b"sent before close"
        with pytest.raises(ConnectionClosed):
            await server.receive()
        with pytest.raises(ConnectionClosed):
            await server.send(b"to a closed peer")
        with pytest.raises(ConnectionClosed):
            await conn.send(b"on our closed end")
        with pytest.raises(ConnectionClosed):
            await conn.receive()
        release.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("direct", [False, True])
async def test_close_wakes_blocked_receiver(direct: bool) -> None:
    net = MemoryNetwork(direct=direct)
    a = MemoryTransport(net, "peer-a", "mem:a")
    b = MemoryTransport(net, "peer-b", "mem:b")
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(a.listen, rec)
        conn = await b.connect("mem:a")
        await trio.testing.wait_all_tasks_blocked()
        (server,) = rec.conns
        # The handler is blocked in receive(); closing the server end from outside ends it.
        await server.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert rec.ended == ["peer-b"]
        with pytest.raises(ConnectionClosed):
            await conn.receive()
        nursery.cancel_scope.cancel()


async def test_backpressure_blocks_sender() -> None:
    net = MemoryNetwork()
    a = MemoryTransport(net, "peer-a", "mem:a")
    b = MemoryTransport(net, "peer-b", "mem:b")
    servers: list[Connection] = []
    release = trio.Event()

    async def slow(conn: Connection) -> None:
        servers.append(conn)
        await release.wait()

    sent = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(a.listen, slow)
        conn = await b.connect("mem:a")

        async def flood() -> None:
            nonlocal sent
            for _ in range(CHANNEL_CAPACITY * 3):
                await conn.send(b"p")
                sent += 1

        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == CHANNEL_CAPACITY  # the next send waits for the reader
        (server,) = servers
        await server.receive()
        await trio.testing.wait_all_tasks_blocked()
        assert sent == CHANNEL_CAPACITY + 1
        release.set()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("direct", [False, True])
async def test_oversize_payload_is_wire_error(direct: bool) -> None:
    net = MemoryNetwork(direct=direct)
    a = MemoryTransport(net, "peer-a", "mem:a", max_frame_size=10)
    b = MemoryTransport(net, "peer-b", "mem:b")  # the receiver's limit applies
    errors: list[BaseException] = []

    async def handler(conn: Connection) -> None:
        try:
            assert await conn.receive() == b"0123456789"
            await conn.receive()
        except WireError as exc:
            errors.append(exc)
            raise

    async with trio.open_nursery() as nursery:
        await nursery.start(a.listen, handler)
        conn = await b.connect("mem:a")
        await conn.send(b"0123456789")
        await conn.send(b"0123456789!")
        with pytest.raises(ConnectionClosed):
            await conn.receive()  # the listener closed the offending connection
        assert len(errors) == 1 and isinstance(errors[0], WireError)
        assert errors[0].reason == "oversize"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("direct", [False, True])
async def test_many_nodes_full_mesh(direct: bool) -> None:
    """150 nodes, each dialing 4 others: cheap enough for large simulations."""
    net = MemoryNetwork(direct=direct)
    n = 150
    transports = [MemoryTransport(net, f"p{i}", f"mem:{i}") for i in range(n)]
    received: list[int] = [0] * n

    def make_handler(i: int) -> Callable[[Connection], Awaitable[None]]:
        async def handler(conn: Connection) -> None:
            await conn.receive()
            received[i] += 1

        return handler

    async with trio.open_nursery() as nursery:
        for i, t in enumerate(transports):
            await nursery.start(t.listen, make_handler(i))
        for i, t in enumerate(transports):
            for k in range(1, 5):
                conn = await t.connect(f"mem:{(i + k) % n}", expected_peer_id=f"p{(i + k) % n}")
                await conn.send(b"hi")
        await trio.testing.wait_all_tasks_blocked()
        assert received == [4] * n
        nursery.cancel_scope.cancel()


def test_satisfies_transport_protocol() -> None:
    """Checked by mypy: MemoryTransport matches the base protocol."""
    transport: Transport = MemoryTransport(MemoryNetwork(), Identity.from_seed(b"\x09" * 32), "m")
    assert transport.local_id == Identity.from_seed(b"\x09" * 32).peer_id
