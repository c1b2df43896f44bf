from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pfl.identity import Identity
from p2pfl.transport.base import Connection, ConnectionClosed, HandshakeError, Transport
from p2pfl.transport.tcp import TcpTransport, format_address, parse_address
from p2pfl.transport.tls import (
    build_context,
    derive_ca_seed,
    federation_ca,
    make_ssl_context,
    node_certificate,
    peer_id_of,
)
from p2pfl.wire.errors import WireError

A = Identity.from_seed(b"\xaa" * 32)
B = Identity.from_seed(b"\xbb" * 32)
C = Identity.from_seed(b"\xcc" * 32)


class Echo:
    """Listener handler: records who connected and echoes every payload back."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.outbound: list[bool] = []
        self.errors: list[BaseException] = []

    async def __call__(self, conn: Connection) -> None:
        self.peers.append(conn.peer_id)
        self.outbound.append(conn.outbound)
        try:
            while True:
                await conn.send(await conn.receive())
        except WireError as exc:
            self.errors.append(exc)
            raise


# --- certificates ------------------------------------------------------------------


def test_federation_ca_is_deterministic_and_separates_federations() -> None:
    ca = federation_ca("fed", None)
    federation_ca.cache_clear()
    again = federation_ca("fed", None)
    assert ca.cert_pem == again.cert_pem  # every member builds the identical certificate
    seeds = {
        derive_ca_seed("fed", None),
        derive_ca_seed("fed2", None),
        derive_ca_seed("fed", b"s3cret"),
        derive_ca_seed("fed", b"other"),
    }
    assert len(seeds) == 4
    with pytest.raises(ValueError):
        derive_ca_seed("fed", b"")


def test_node_certificate_binds_identity_key() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.x509.oid import NameOID

    ca = federation_ca("fed", None)
    cert = node_certificate(A, ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == A.peer_id
    assert cert.issuer == ca.cert.subject
    assert cert.public_key() == Ed25519PublicKey.from_public_bytes(A.public_bytes)
    cert.verify_directly_issued_by(ca.cert)


def test_context_settings_and_cache() -> None:
    ctx = make_ssl_context(A, "fed", None, server=True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert not ctx.check_hostname
    assert make_ssl_context(A, "fed", None, server=True) is ctx
    assert make_ssl_context(A, "fed", b"x", server=True) is not ctx
    client = make_ssl_context(A, "fed", None, server=False)
    assert client.verify_mode == ssl.CERT_REQUIRED and not client.check_hostname


def test_no_key_files_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import p2pfl.transport.tls as tls

    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*args: Any, **kwargs: Any) -> str:
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tls, "_ram_tmp_dir", lambda: str(tmp_path))
    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    make_ssl_context(Identity.generate(), "leftovers", None, server=False)
    assert made and all(m.startswith(str(tmp_path)) for m in made)  # the spy saw the dir
    assert os.listdir(tmp_path) == []


def test_peer_id_of_rejects_missing_cert() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> object:
            return None

    with pytest.raises(HandshakeError):
        peer_id_of(NoCert())


# --- addresses ---------------------------------------------------------------------


def test_parse_and_format_address() -> None:
    assert parse_address("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address("node.lan:1") == ("node.lan", 1)
    assert format_address("::1", 80) == "[::1]:80"
    assert format_address("10.0.0.1", 5) == "10.0.0.1:5"
    for bad in ["127.0.0.1", "::1:80", "[::1]80", ":80", "host:http", "host:70000", "mem:x"]:
        with pytest.raises(ValueError, match="bad address"):
            parse_address(bad)


# --- handshakes over loopback ---------------------------------------------------------


async def test_round_trip_with_pinned_ids() -> None:
    server, client = TcpTransport(A, federation="t"), TcpTransport(B, federation="t")
    echo = Echo()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, echo)
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        conn = await client.connect(address, expected_peer_id=A.peer_id)
        assert conn.peer_id == A.peer_id and conn.outbound
        assert conn.remote_address == address
        for payload in [b"hello", b"", bytes(range(256)) * 300]:
            await conn.send(payload)
            assert await conn.receive() == payload
        big = os.urandom(5 * 1024 * 1024)
        await conn.send(big)
        assert await conn.receive() == big
        assert echo.peers == [B.peer_id] and echo.outbound == [False]
        await conn.aclose()
        await conn.aclose()  # idempotent
        with pytest.raises(ConnectionClosed):
            await conn.send(b"after close")
        nursery.cancel_scope.cancel()


async def test_concurrent_sends_do_not_interleave() -> None:
    server, client = TcpTransport(A), TcpTransport(B)
    echo = Echo()
    payloads = [bytes([i]) * (200_000 + i) for i in range(6)]
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, echo)
        conn = await client.connect(address)
        got: list[bytes] = []

        async def collect() -> None:
            for _ in payloads:
                got.append(await conn.receive())

        async with trio.open_nursery() as tasks:
            tasks.start_soon(collect)  # read while sending, or the echo deadlocks
            for p in payloads:
                tasks.start_soon(conn.send, p)
        assert sorted(got) == sorted(payloads)
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_wrong_expected_id_fails(caplog: pytest.LogCaptureFixture) -> None:
    server, client = TcpTransport(A), TcpTransport(B)
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, Echo())
        with (
            caplog.at_level(logging.WARNING, logger="p2pfl.transport"),
            pytest.raises(HandshakeError, match=f"proved id {A.peer_id}, expected"),
        ):
            await client.connect(address, expected_peer_id=C.peer_id)
        assert any(C.peer_id in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()


async def test_other_federation_fails_and_listener_survives() -> None:
    server = TcpTransport(A, federation="alpha", secret=b"k" * 32)
    echo = Echo()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, echo)
        for intruder in [
            TcpTransport(C, federation="beta", secret=b"k" * 32),
            TcpTransport(C, federation="alpha", secret=b"j" * 32),
            TcpTransport(C, federation="alpha"),
        ]:
            with pytest.raises(HandshakeError, match="federation"):
                await intruder.connect(address)
        good = TcpTransport(B, federation="alpha", secret=b"k" * 32)
        conn = await good.connect(address, A.peer_id)
        await conn.send(b"still here")
        assert await conn.receive() == b"still here"
        assert echo.peers == [B.peer_id]
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_server_refusing_client_cert_fails_connect() -> None:
    """A client that trusts the server but holds a foreign certificate: in TLS 1.3 its
    own handshake completes, so only the server's accept byte reveals the refusal."""
    server = TcpTransport(A, federation="alpha")
    client = TcpTransport(B, federation="alpha")
    foreign_cert = node_certificate(B, federation_ca("beta", None))
    client._client_context = build_context(
        B, federation_ca("alpha", None), foreign_cert, server=False
    )
    echo = Echo()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, echo)
        with pytest.raises(HandshakeError, match="refused our certificate"):
            await client.connect(address)
        assert echo.peers == []
        nursery.cancel_scope.cancel()


async def test_oversize_frame_gives_wire_error() -> None:
    server = TcpTransport(A, max_frame_size=1000)
    client = TcpTransport(B)
    echo = Echo()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, echo)
        conn = await client.connect(address)
        await conn.send(b"x" * 1000)  # at the limit: fine
        assert await conn.receive() == b"x" * 1000
        await conn.send(b"x" * 1001)
        with pytest.raises(ConnectionClosed):
            await conn.receive()  # the server closed this connection
        assert len(echo.errors) == 1
        assert isinstance(echo.errors[0], WireError) and echo.errors[0].reason == "oversize"
        nursery.cancel_scope.cancel()


async def test_dial_refused_is_oserror() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there any more
    with pytest.raises(OSError):
        await TcpTransport(B).connect(f"127.0.0.1:{port}")


@pytest.mark.trio
async def test_silent_client_times_out_and_listener_survives(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    server = TcpTransport(A, handshake_timeout=5.0)
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, Echo())
        host, port = parse_address(address)
        stream = await trio.open_tcp_stream(host, port)
        with caplog.at_level(logging.WARNING, logger="p2pfl.transport"):
            with trio.fail_after(60):  # mock time; the server gives up after 5
                assert await stream.receive_some(100) == b""
        assert any("timed out" in r.getMessage() for r in caplog.records)
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_key_file_is_not_needed_after_context(tmp_path: Path) -> None:
    """Contexts are built from in-memory keys; nothing is written next to the data dir."""
    ident = Identity.load_or_create(tmp_path)
    make_ssl_context(ident, "files", None, server=True)
    assert sorted(os.listdir(tmp_path)) == ["identity.key"]


def test_satisfies_transport_protocol() -> None:
    """Checked by mypy: TcpTransport and its connections match the base protocols."""
    transport: Transport = TcpTransport(A)
    assert transport.local_id == A.peer_id


# --- messages in parts ---------------------------------------------------------------


class Recorder:
    """Listener handler: reads nothing until told to, then records every payload."""

    def __init__(self) -> None:
        self.read = trio.Event()
        self.got: list[bytes] = []
        self.errors: list[BaseException] = []

    async def __call__(self, conn: Connection) -> None:
        await self.read.wait()
        try:
            while True:
                self.got.append(await conn.receive())
        except WireError as exc:
            self.errors.append(exc)
            raise


async def test_a_small_message_overtakes_a_large_one_between_its_parts() -> None:
    """A heartbeat used to wait until a whole model update was written; now it goes
    out between two parts of it, and the receiver gets it first."""
    big = os.urandom(64 * 1024 * 1024)  # far more than loopback's socket buffers hold
    server = TcpTransport(A, max_frame_size=len(big))
    client = TcpTransport(B)
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, rec)
        conn = await client.connect(address)
        nursery.start_soon(conn.send, big)
        # The receiver does not read yet: the big send fills the socket buffers and
        # blocks between parts. (`buffered` and the lock tell us it is mid-message.)
        while not conn._send_lock.locked():
            await trio.sleep(0.01)
        await trio.sleep(0.2)
        small = trio.Event()

        async def send_small() -> None:
            await conn.send(b"pong")
            small.set()

        nursery.start_soon(send_small)
        rec.read.set()
        with trio.fail_after(60):
            while len(rec.got) < 2:
                await trio.sleep(0.01)
        assert rec.got[0] == b"pong"
        assert rec.got[1] == big
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_a_message_in_parts_above_the_limit_is_refused_at_its_first_header() -> None:
    server = TcpTransport(A, max_frame_size=3 * 1024 * 1024)
    client = TcpTransport(B)
    rec = Recorder()
    rec.read.set()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, rec)
        conn = await client.connect(address)
        ok = os.urandom(3 * 1024 * 1024)  # exactly the limit, in 3 parts
        await conn.send(ok)
        with contextlib.suppress(ConnectionClosed):  # refused: the server hangs up
            await conn.send(b"x" * (3 * 1024 * 1024 + 1))
        with trio.fail_after(30):
            while not rec.errors:
                await trio.sleep(0.01)
        assert rec.got == [ok]
        error = rec.errors[0]
        assert isinstance(error, WireError) and error.reason == "oversize"
        assert "message of 3145729 bytes" in error.detail
        await conn.aclose()
        nursery.cancel_scope.cancel()


# --- closing while a frame is being read ---------------------------------------------


class _HandOverStream:
    """A stream whose reads the test hands over one at a time, even after it was
    closed: trio's SSLStream returns bytes it already decrypted although a close or a
    cancel came in meanwhile."""

    def __init__(self) -> None:
        self.reads: trio.MemorySendChannel[bytes]
        self.reads, self._incoming = trio.open_memory_channel[bytes](10)

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._incoming.receive()

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_bytes_read_after_a_close_are_not_parsed_as_a_new_frame() -> None:
    """A stopping node used to clear its half-read frame on close while its reader
    still fed the rest of it, then parsed payload bytes as a header: it logged an
    honest peer's update as an 'oversize' frame (seen at every restart in a churn run)."""
    from p2pfl.transport.base import TransportLimits
    from p2pfl.transport.budget import ReceiveBudget
    from p2pfl.transport.tcp import TcpConnection
    from p2pfl.wire.framing import frame_header

    stream = _HandOverStream()
    limits = TransportLimits(max_frame_size=1000)
    conn = TcpConnection(
        stream,  # type: ignore[arg-type]
        "peer",
        "fake",
        outbound=True,
        limits=limits,
        budget=ReceiveBudget(limits.receive_budget),
    )
    payload = b"\xff\xff\xff\xff" + b"x" * 96  # its first bytes read as a header: oversize
    outcome: list[BaseException | bytes] = []

    async def read() -> None:
        try:
            outcome.append(await conn.receive())
        except (ConnectionClosed, WireError) as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await stream.reads.send(frame_header(len(payload)))  # the header is in
        await trio.testing.wait_all_tasks_blocked()
        await conn.aclose()  # the node stops: the partial frame is dropped
        await stream.reads.send(payload)  # ... and the rest was already read
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed), outcome
