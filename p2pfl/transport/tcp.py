"""TCP + mutual TLS 1.3 transport on trio.

After the TLS handshake the accepting side writes one byte (ACCEPT) before any frame.
Why: in TLS 1.3 the client finishes its handshake before the server has checked the
client certificate, so without it a refused client would only notice on its first read.
With it, `connect` returns only once the server has accepted our certificate, and a
refusal surfaces there as HandshakeError.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

import trio

from p2pfl.identity import Identity
from p2pfl.transport.base import Connection, ConnectionClosed, ConnectionHandler, HandshakeError
from p2pfl.transport.tls import make_ssl_context, peer_id_of
from p2pfl.wire.address import parse_address as parse_address  # the one parser, re-exported
from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, frame_header

log = logging.getLogger("p2pfl.transport")

ACCEPT = b"\x01"
RECEIVE_CHUNK = 256 * 1024
SMALL_PAYLOAD = 64 * 1024  # below this, header + payload go out as one buffer
SEND_SLICE = 1024 * 1024  # big payloads are encrypted and sent a slice at a time
CLOSE_TIMEOUT = 2.0


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockaddr_text(sockaddr: Any) -> str:
    return format_address(str(sockaddr[0]), int(sockaddr[1]))


def _tls_reason(exc: BaseException) -> str:
    """The OpenSSL reason behind trio's BrokenResourceError, for one readable log line."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"{cause.reason}: {cause.verify_message} "
            "(peer is not in our federation: other name or secret?)"
        )
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
            reason += " (peer refused our certificate: other federation name or secret?)"
        return reason
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc) or type(exc).__name__


def _refused(peer_id: str, address: str, what: str) -> str:
    return (
        f"peer {peer_id} at {address} {what} after the TLS handshake "
        "(it refused our certificate: other federation name or secret?)"
    )


class TcpConnection:
    """One authenticated TLS stream carrying length-prefixed payloads."""

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        peer_id: str,
        remote_address: str,
        *,
        outbound: bool,
        max_frame_size: int,
        initial: bytes = b"",
    ) -> None:
        self._stream = stream
        self._peer_id = peer_id
        self._remote_address = remote_address
        self._outbound = outbound
        self._decoder = FrameDecoder(max_frame_size)
        if initial:
            self._decoder.feed(initial)
        self._send_lock = trio.Lock()
        self._closed = False

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def remote_address(self) -> str:
        return self._remote_address

    @property
    def outbound(self) -> bool:
        return self._outbound

    def __repr__(self) -> str:
        way = "to" if self._outbound else "from"
        return f"<TcpConnection {way} {self._peer_id} at {self._remote_address}>"

    async def send(self, payload: bytes) -> None:
        if self._closed:
            raise ConnectionClosed(f"connection to {self._peer_id} is closed")
        try:
            async with self._send_lock:
                if len(payload) < SMALL_PAYLOAD:
                    await self._stream.send_all(frame_header(len(payload)) + payload)
                    return
                await self._stream.send_all(frame_header(len(payload)))
                view = memoryview(payload)
                for start in range(0, len(view), SEND_SLICE):
                    await self._stream.send_all(view[start : start + SEND_SLICE])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection to {self._peer_id} lost: {exc}") from exc

    async def receive(self) -> bytes:
        while True:
            payload = self._decoder.next_frame()  # raises WireError("oversize")
            if payload is not None:
                return payload
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(f"connection to {self._peer_id} lost: {exc}") from exc
            if not data:
                raise ConnectionClosed(f"{self._peer_id} closed the connection")
            self._decoder.feed(data)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        # Graceful close_notify, bounded: a peer that stopped reading must not hold us.
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError
            ):
                await self._stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream.transport_stream)


class TcpTransport:
    """Transport over TCP with mutual TLS 1.3; peers are authenticated by key hash."""

    def __init__(
        self,
        identity: Identity,
        *,
        federation: str = "default",
        secret: bytes | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.identity = identity
        self.federation = federation
        self.host = host
        self.port = port
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self._server_context = make_ssl_context(identity, federation, secret, server=True)
        self._client_context = make_ssl_context(identity, federation, secret, server=False)

    @property
    def local_id(self) -> str:
        return self.identity.peer_id

    async def listen(
        self,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        addresses = [_sockaddr_text(lst.socket.getsockname()) for lst in listeners]
        log.info("%s listening on %s", self.local_id, ", ".join(addresses))
        task_status.started(addresses)

        async def serve_one(stream: trio.SocketStream) -> None:
            await self._serve_one(stream, handler)

        await trio.serve_listeners(serve_one, listeners)

    async def _serve_one(self, stream: trio.SocketStream, handler: ConnectionHandler) -> None:
        try:
            remote = _sockaddr_text(stream.socket.getpeername())
        except OSError:
            remote = "?"
        ssl_stream = trio.SSLStream(stream, self._server_context, server_side=True)
        try:
            with trio.fail_after(self.handshake_timeout):
                await ssl_stream.do_handshake()
                peer_id = peer_id_of(ssl_stream)
                await ssl_stream.send_all(ACCEPT)
        except trio.TooSlowError:
            log.warning("inbound handshake from %s timed out", remote)
            await trio.aclose_forcefully(stream)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("inbound handshake from %s failed: %s", remote, _tls_reason(exc))
            await trio.aclose_forcefully(stream)
            return
        except HandshakeError as exc:
            log.warning("inbound handshake from %s failed: %s", remote, exc)
            await trio.aclose_forcefully(stream)
            return
        conn = TcpConnection(
            ssl_stream, peer_id, remote, outbound=False, max_frame_size=self.max_frame_size
        )
        log.debug("accepted %r", conn)
        try:
            await handler(conn)
        except ConnectionClosed as exc:
            log.info("connection from %s ended: %s", peer_id, exc)
        except WireError as exc:
            log.warning("bad frame from %s (%s), closing: %s", peer_id, remote, exc)
        finally:
            await conn.aclose()

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        host, port = parse_address(address)
        with trio.move_on_after(self.handshake_timeout) as dial_scope:
            stream = await trio.open_tcp_stream(host, port)  # OSError propagates
        if dial_scope.cancelled_caught:
            raise TimeoutError(f"dialing {address} timed out after {self.handshake_timeout}s")
        ssl_stream = trio.SSLStream(stream, self._client_context, server_side=False)
        peer_id: str | None = None
        try:
            with trio.fail_after(self.handshake_timeout):
                await ssl_stream.do_handshake()
                peer_id = peer_id_of(ssl_stream)
                if expected_peer_id is not None and peer_id != expected_peer_id:
                    log.warning(
                        "peer at %s proved id %s, expected %s", address, peer_id, expected_peer_id
                    )
                    raise HandshakeError(
                        f"peer at {address} proved id {peer_id}, expected {expected_peer_id}"
                    )
                first = await ssl_stream.receive_some(RECEIVE_CHUNK)
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise HandshakeError(
                f"handshake with {address} timed out after {self.handshake_timeout}s"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(stream)
            if peer_id is None:
                msg = f"TLS handshake with {address} failed: {_tls_reason(exc)}"
            else:
                msg = _refused(peer_id, address, "closed the connection")
            raise HandshakeError(msg) from exc
        except HandshakeError:
            await trio.aclose_forcefully(stream)
            raise
        if first[:1] != ACCEPT:
            await trio.aclose_forcefully(stream)
            why = "closed the connection" if not first else "sent an unexpected first byte"
            raise HandshakeError(_refused(peer_id, address, why))
        return TcpConnection(
            ssl_stream,
            peer_id,
            address,
            outbound=True,
            max_frame_size=self.max_frame_size,
            initial=bytes(first[1:]),
        )
