"""Link: bounded outbound queue, writer, and which queued update is still in flight."""

from __future__ import annotations

import trio
import trio.testing

from p2pfl.node.link import Link
from p2pfl.transport.base import ConnectionClosed


class FakeConnection:
    """Records what is written; `gate` lets a test hold the writer mid-queue."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.started: list[bytes] = []  # sends entered (a writer is inside them)
        self.gate = trio.Semaphore(0)
        self.broken = False

    @property
    def peer_id(self) -> str:
        return "peer"

    @property
    def remote_address(self) -> str:
        return "fake"

    @property
    def outbound(self) -> bool:
        return True

    async def send(self, payload: bytes) -> None:
        self.started.append(payload)
        await self.gate.acquire()
        if self.broken:
            raise ConnectionClosed("gone")
        self.sent.append(payload)

    async def receive(self) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        pass


def test_offer_respects_the_byte_budget() -> None:
    link = Link(FakeConnection(), "peer", "test")
    assert link.offer(b"x" * 60, limit=100)
    assert not link.offer(b"y" * 60, limit=100)  # would exceed: refused, not queued
    assert link.offer(b"z" * 40, limit=100)
    assert (link.queued_bytes, link.enqueued) == (100, 2)


async def test_an_update_is_in_flight_until_the_writer_has_written_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConnection()
    link = Link(conn, "peer", "test")
    written: list[int] = []
    link.offer(b"hello", limit=1000)
    link.offer(b"update-7", limit=1000)
    link.update_queued(7)
    link.offer(b"ping", limit=1000)
    assert link.update_in_flight(7)
    assert not link.update_in_flight(6)  # never queued here: not in flight
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.pump, written.append)
        conn.gate.release()  # "hello" goes out
        await trio.sleep(1)
        assert link.update_in_flight(7)
        conn.gate.release()  # the update goes out
        await trio.sleep(1)
        assert not link.update_in_flight(7)
        conn.gate.release()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert conn.sent == [b"hello", b"update-7", b"ping"]
    assert written == [9, 12, 8]  # payload + 4-byte frame header
    assert link.queued_bytes == 0 and link.written == 3


def test_only_recent_rounds_are_remembered() -> None:
    link = Link(FakeConnection(), "peer", "test")
    for r in range(10):
        link.offer(b"u", limit=1000)
        link.update_queued(r)
    assert link.update_in_flight(9) and link.update_in_flight(7)
    assert not link.update_in_flight(6)  # forgotten: a request for it is answered


async def test_unsent_messages_move_to_the_successor_and_a_broken_link_cancels(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old, new = Link(FakeConnection(), "peer", "test"), Link(FakeConnection(), "peer", "test")
    for payload in (b"a", b"bb", b"ccc"):
        old.offer(payload, limit=1000)
    old.move_unsent_to(new)
    assert (old.queued_bytes, new.queued_bytes, new.enqueued) == (0, 6, 3)
    conn = FakeConnection()
    conn.broken = True
    link = Link(conn, "peer", "test")
    link.offer(b"lost", limit=1000)
    conn.gate.release()
    with link.scope:
        await link.pump(lambda n: None)
    assert link.scope.cancel_called and link.written == 0


class _OverlapCheckingConnection(FakeConnection):
    """Fails the test if two sends ever overlap (half a frame, then another frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_send = False

    async def send(self, payload: bytes) -> None:
        assert not self.in_send, "two writers on one connection"
        self.in_send = True
        try:
            await super().send(payload)
        finally:
            self.in_send = False


async def test_bye_waits_for_the_frame_in_progress_and_stops_the_writer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At shutdown the Bye used to be written straight onto the connection while the
    writer could be inside a large frame: the peer then read garbage as a 2 GB length."""
    conn = _OverlapCheckingConnection()
    link = Link(conn, "peer", "test")
    for payload in (b"big-update", b"queued-after"):
        link.offer(payload, limit=1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.pump, lambda n: None)
        await trio.sleep(0.1)  # the writer is inside its first send (gate closed)
        assert link.writing

        async def finish_the_frame() -> None:
            await trio.sleep(0.2)
            for _ in range(2):
                conn.gate.release()  # the big frame, then the Bye

        nursery.start_soon(finish_the_frame)
        assert await link.say_bye(b"bye")
        nursery.cancel_scope.cancel()
    # The frame finished, nothing else queued went out after it, then the Bye.
    assert conn.sent == [b"big-update", b"bye"]


async def test_no_bye_when_the_frame_in_progress_does_not_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = _OverlapCheckingConnection()
    link = Link(conn, "peer", "test")
    link.offer(b"huge-update", limit=1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.pump, lambda n: None)
        await trio.sleep(0.1)
        assert not await link.say_bye(b"bye", grace=0.5)  # never interleaved
        nursery.cancel_scope.cancel()
    assert conn.sent == []


async def test_heartbeats_do_not_wait_for_updates_queued_or_being_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A Pong used to wait behind every model update queued on the link (seconds at
    1e7 parameters), then behind the one being written; now it has a writer of its
    own and goes to the connection at once (TCP slips it between the update's parts)."""
    conn = FakeConnection()
    link = Link(conn, "peer", "test")
    link.offer(b"update-1", limit=1000)
    link.update_queued(1)
    link.offer(b"update-2", limit=1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.pump, lambda n: None)
        await trio.sleep(0.1)  # the update writer is inside update-1
        link.offer(b"pong", limit=1000, urgent=True)
        await trio.sleep(0.1)
        assert conn.started == [b"update-1", b"pong"]  # update-1 still unfinished
        for _ in range(3):
            conn.gate.release()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sorted(conn.sent) == [b"pong", b"update-1", b"update-2"]
    assert conn.sent.index(b"update-1") < conn.sent.index(b"update-2")
    # Heartbeats do not count as queued messages: update positions stay exact.
    assert link.enqueued == 2 and link.written == 2
    assert not link.update_in_flight(1)
