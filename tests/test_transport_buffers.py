"""The TLS transport's direct body reads: a frame body of DIRECT_BODY bytes or more is
decrypted straight into one buffer of its length (FrameDecoder.detach_body, then
TcpConnection reading into it). Splits at every offset, odd write sizes, the fallback
through receive_some, and the limits still checked before a body byte is read."""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from p2pfl.identity import Identity
from p2pfl.transport.base import Connection
from p2pfl.transport.tcp import ACCEPT, DIRECT_BODY, TcpConnection, TcpTransport, parse_address
from p2pfl.transport.tls import make_ssl_context
from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import FrameDecoder, Part, frame_header, split_parts

A = Identity.from_seed(b"\xa1" * 32)
B = Identity.from_seed(b"\xb2" * 32)


def framed(payload: bytes, part_size: int = 1024 * 1024) -> bytes:
    """The bytes a sender puts on the wire for `payload` (parts above part_size)."""
    out = bytearray()
    for part, start, end in split_parts(len(payload), part_size):
        out += frame_header(end - start, part, len(payload)) + payload[start:end]
    return bytes(out)


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


# --- FrameDecoder.detach_body (sans-IO) ---------------------------------------------


def test_detach_body_at_every_split_of_a_small_frame() -> None:
    payload = pattern(300)
    wire = framed(payload)
    for k in range(4, len(wire)):
        decoder = FrameDecoder(1000)
        decoder.feed(wire[:k])
        assert decoder.next_frame() is None
        assert decoder.pending_length == 300
        body, filled = decoder.detach_body()
        assert filled == k - 4 and len(body) == 300
        assert body[:filled] == payload[:filled]
        body[filled:] = wire[k:]
        assert body == payload
        assert decoder.buffered == 0 and decoder.pending_length is None
        assert decoder.part is Part.WHOLE
        # The decoder goes on with the next frame as if it had returned this one.
        decoder.feed(framed(b"next"))
        assert decoder.next_frame() == b"next"


def test_detach_body_of_a_first_part_across_large_and_small_chunks() -> None:
    payload = pattern(200_000)
    wire = framed(payload, part_size=100_000)  # FIRST (8-byte header), LAST
    first_end = 8 + 100_000
    for k in (8, 9, 1000, 64 * 1024, 70_000, first_end - 1):
        decoder = FrameDecoder(300_000)
        decoder.feed(wire[: min(k, 5)])
        decoder.feed(wire[min(k, 5) : k])
        assert decoder.next_frame() is None
        assert decoder.pending_part is Part.FIRST and decoder.pending_total == 200_000
        body, filled = decoder.detach_body()
        assert filled == k - 8
        body[filled:] = wire[k:first_end]
        assert body == payload[:100_000]
        assert decoder.part is Part.FIRST and decoder.total == 200_000
        assert decoder.buffered == 0


def test_detach_body_needs_a_parsed_header() -> None:
    decoder = FrameDecoder(1000)
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is None
    try:
        decoder.detach_body()
    except RuntimeError:
        pass
    else:
        raise AssertionError("detach_body without a header")


# --- over real TLS -------------------------------------------------------------------


async def raw_peer(address: str) -> trio.SSLStream[trio.SocketStream]:
    host, port = parse_address(address)
    stream = trio.SSLStream(
        await trio.open_tcp_stream(host, port),
        make_ssl_context(B, "default", None, server=False),
    )
    await stream.do_handshake()
    assert await stream.receive_some(1) == ACCEPT
    return stream


async def send_in_pieces(stream: trio.abc.SendStream, data: bytes, sizes: list[int]) -> None:
    """Write `data` in writes of the given sizes, cycling (so each is its own TLS record
    or records, splitting headers and bodies at odd offsets)."""
    i = pos = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        await stream.send_all(data[pos : pos + n])
        pos += n
        i += 1


class Inbox:
    def __init__(self, *, fallback: bool = False) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes | BaseException](100)
        self.fallback = fallback

    async def __call__(self, conn: Connection) -> None:
        if self.fallback:  # as if trio renamed SSLStream's internals
            assert isinstance(conn, TcpConnection)
            conn._tls = None
        try:
            while True:
                await self.send.send(await conn.receive())
        except WireError as exc:
            await self.send.send(exc)


PAYLOADS = [
    pattern(DIRECT_BODY - 1),  # through the decoder
    pattern(DIRECT_BODY),  # direct
    pattern(1024 * 1024),  # one whole frame, direct
    pattern(2 * 1024 * 1024 + 2500 + 3),  # FIRST, MORE, LAST
    b"",
    b"small",
]


async def check_payloads_arrive(sizes: list[int], *, fallback: bool = False) -> None:
    server = TcpTransport(A, max_frame_size=4 * 1024 * 1024)
    inbox = Inbox(fallback=fallback)
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, inbox)
        with trio.fail_after(30):
            peer = await raw_peer(address)
            wire = b"".join(framed(p) for p in PAYLOADS)
            nursery.start_soon(send_in_pieces, peer, wire, sizes)
            for expected in PAYLOADS:
                got = await inbox.receive.receive()
                assert type(got) is bytes and got == expected
            await trio.testing.wait_all_tasks_blocked()
            assert server.buffered() == 0 and server.budget.used == 0
        nursery.cancel_scope.cancel()


async def test_payloads_arrive_whole_in_large_writes() -> None:
    await check_payloads_arrive([4 * 1024 * 1024])


async def test_payloads_arrive_whole_in_odd_writes() -> None:
    await check_payloads_arrive([1, 7, 3, 4093, 16385, 70001, 5, 262147])


async def test_payloads_arrive_whole_without_sslstream_internals() -> None:
    await check_payloads_arrive([1, 7, 3, 4093, 16385, 70001, 5, 262147], fallback=True)


async def test_an_oversized_large_frame_is_refused_before_its_body() -> None:
    server = TcpTransport(A, max_frame_size=128 * 1024)
    inbox = Inbox()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, inbox)
        with trio.fail_after(30):
            peer = await raw_peer(address)
            await peer.send_all(framed(pattern(128 * 1024)))  # at the limit: fine
            assert await inbox.receive.receive() == pattern(128 * 1024)
            await peer.send_all(frame_header(128 * 1024 + 1))
            # The server may refuse and close before the body is all sent: a reset here
            # is the refusal, not a failure.
            with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
                await peer.send_all(b"\x00" * (128 * 1024 + 1))
            error = await inbox.receive.receive()
            assert isinstance(error, WireError) and error.reason == "oversize"
            assert server.budget.peak <= 128 * 1024
            await trio.testing.wait_all_tasks_blocked()
            assert server.buffered() == 0 and server.budget.used == 0
        nursery.cancel_scope.cancel()


async def test_a_partial_large_body_is_counted_and_dropped() -> None:
    server = TcpTransport(A, max_frame_size=1024 * 1024)
    inbox = Inbox()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, inbox)
        with trio.fail_after(30):
            peer = await raw_peer(address)
            await peer.send_all(frame_header(512 * 1024) + b"\x01" * (200 * 1024))
            while server.buffered() < 4 + 200 * 1024:
                await trio.sleep(0.01)
            assert server.buffered() == 4 + 200 * 1024  # header + body so far
            assert server.budget.used == 512 * 1024
            await trio.aclose_forcefully(peer)
            while server.stats()["connections"]:
                await trio.sleep(0.01)
            assert server.buffered() == 0 and server.budget.used == 0
        nursery.cancel_scope.cancel()


async def test_a_receive_cancelled_halfway_through_a_body_resumes() -> None:
    """A reader under a timeout (cancelled while a large body is half in) gets the same
    message whole on its next receive, and the frames after it."""
    server = TcpTransport(A, max_frame_size=1024 * 1024)
    got: list[bytes] = []
    cancelled = [0]

    async def impatient(conn: Connection) -> None:
        while True:
            with trio.move_on_after(0.05) as scope:
                got.append(await conn.receive())
            cancelled[0] += scope.cancelled_caught

    payload = pattern(300 * 1024)
    wire = framed(payload) + framed(b"after")
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, impatient)
        with trio.fail_after(30):
            peer = await raw_peer(address)
            await peer.send_all(wire[: 4 + 100 * 1024])
            while server.buffered() < 4 + 100 * 1024:
                await trio.sleep(0.01)
            await trio.sleep(0.2)  # the reader gives up a few times meanwhile
            assert cancelled[0] >= 2 and got == []
            assert server.buffered() == 4 + 100 * 1024
            await peer.send_all(wire[4 + 100 * 1024 :])
            while len(got) < 2:
                await trio.sleep(0.01)
            assert got == [payload, b"after"]
            assert server.buffered() == 0 and server.budget.used == 0
        nursery.cancel_scope.cancel()
