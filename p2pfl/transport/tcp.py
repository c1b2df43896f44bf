"""TCP + mutual TLS 1.3 transport on trio.

After the TLS handshake the accepting side writes one byte (ACCEPT) before any frame.
Why: in TLS 1.3 the client finishes its handshake before the server has checked the
client certificate, so without it a refused client would only notice on its first read.
With it, `connect` returns only once the server has accepted our certificate, and a
refusal surfaces there as HandshakeError. A server at its inbound connection limit writes
BUSY instead and closes, so the dialer can say why and back off.

Resource bounds (docs/security.md): the handshake has a deadline; each connection holds
at most one partial frame, reads exactly up to the end of it, and reserves its announced
size from the transport's shared `ReceiveBudget` before reading its body; a frame whose
header has arrived must complete within its deadline (`TransportLimits.frame_deadline`);
at most `max_inbound` accepted connections are open at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import trio

from p2pfl.identity import Identity
from p2pfl.logs import event
from p2pfl.transport.base import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Connection,
    ConnectionClosed,
    ConnectionEnds,
    ConnectionHandler,
    HandshakeError,
    TransportLimits,
)
from p2pfl.transport.budget import ReceiveBudget, give_back_memory
from p2pfl.transport.refusals import (
    HandshakeFailures,
    log_inbound_failure,
    refused_text,
    send_alert,
    tls_reason,
)
from p2pfl.transport.tls import make_ssl_context, peer_id_of
from p2pfl.wire.address import parse_address as parse_address  # the one parser, re-exported
from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    Part,
    PartAssembler,
    frame_header,
    frame_header_size,
    split_parts,
)

log = logging.getLogger("p2pfl.transport")

ACCEPT = b"\x01"
BUSY = b"\x02"  # instead of ACCEPT: the server is at its inbound connection limit
RECEIVE_CHUNK = 256 * 1024
# Frame bodies at least this long are read straight into one buffer of their length
# (TLS records decrypted into it in place) instead of through the decoder's chunks.
DIRECT_BODY = 64 * 1024
SMALL_PAYLOAD = 64 * 1024  # below this, header + payload go out as one buffer
CLOSE_TIMEOUT = 2.0
REFUSAL_LOG_EVERY = 10.0  # seconds between "inbound limit reached" lines


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockaddr_text(sockaddr: Any) -> str:
    return format_address(str(sockaddr[0]), int(sockaddr[1]))


class TcpConnection(ConnectionEnds):
    """One authenticated TLS stream carrying length-prefixed payloads."""

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        peer_id: str,
        remote_address: str,
        *,
        outbound: bool,
        limits: TransportLimits,
        budget: ReceiveBudget,
        on_close: Callable[[TcpConnection], None] | None = None,
    ) -> None:
        self.last_activity: float | None = None  # when bytes last arrived
        self._stream = stream
        super().__init__(peer_id, remote_address, outbound=outbound)
        self._limits = limits
        self._budget = budget
        self._on_close = on_close
        self._decoder = FrameDecoder(limits.max_frame_size)
        self._parts = PartAssembler()
        self._admitted = False  # the pending frame's header was checked and budgeted
        self._reserved = 0  # bytes of the budget held for the single frame in progress
        self._message_reserved = 0  # ... and for the multi-part message in progress
        self._deadline: float | None = None  # when the frame in progress must be complete
        self._message_deadline: float | None = None  # ... and the multi-part message
        self._send_lock = trio.Lock()
        self._closed = False
        # The body of the frame in progress when read directly (DIRECT_BODY), how much
        # of it arrived, and its header's size (still counted in `buffered`). Kept here,
        # not in a local, so a receive cancelled halfway resumes where it stopped.
        self._body: bytearray | None = None
        self._body_got = 0
        self._body_head = 0
        # trio.SSLStream's SSLObject and incoming BIO, to decrypt records in place; if a
        # trio release renames them, bodies go through receive_some (slower, same bytes).
        ssl_object = getattr(stream, "_ssl_object", None)
        incoming = getattr(stream, "_incoming", None)
        recv_lock = getattr(stream, "_inner_recv_lock", None)
        self._tls: tuple[ssl.SSLObject, ssl.MemoryBIO, trio.Lock] | None = (
            (ssl_object, incoming, recv_lock)
            if isinstance(ssl_object, ssl.SSLObject)
            and isinstance(incoming, ssl.MemoryBIO)
            and isinstance(recv_lock, trio.Lock)
            and hasattr(stream, "_inner_recv_count")
            else None
        )

    @property
    def buffered(self) -> int:
        """Bytes of a partially received frame or message held right now."""
        body = self._body_head + self._body_got if self._body is not None else 0
        return self._decoder.buffered + self._parts.held + body

    @property
    def reserved(self) -> int:
        """Bytes of the transport's receive budget this connection holds."""
        return self._reserved + self._message_reserved

    async def send(self, payload: bytes) -> None:
        if self._closed:
            raise ConnectionClosed(f"connection to {self._peer_id} is closed")
        try:
            if len(payload) < SMALL_PAYLOAD:
                async with self._send_lock:
                    await self._stream.send_all(frame_header(len(payload)) + payload)
                return
            # One part at a time, the lock released in between: another task's message
            # (a heartbeat) goes out between two parts instead of after the whole model.
            view = memoryview(payload)
            for part, start, end in split_parts(len(payload)):
                async with self._send_lock:
                    await self._stream.send_all(frame_header(end - start, part, len(payload)))
                    await self._stream.send_all(view[start:end])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection to {self._peer_id} lost: {exc}") from exc

    async def receive(self) -> bytes:
        """The next payload. Raises ConnectionClosed at EOF, WireError("oversize") for a
        frame above the limit, WireError("frame_deadline") for a frame that did not
        complete in time and WireError("receive_budget") when no room for it was freed
        within that time; after any of them the partial frame is gone."""
        if self._closed:
            raise ConnectionClosed(f"connection to {self._peer_id} is closed")
        try:
            return await self._receive()
        except (ConnectionClosed, WireError):
            self._drop_partial()
            raise

    async def _receive(self) -> bytes:
        decoder = self._decoder
        while True:
            payload: bytes | bytearray | None
            if self._body is not None:  # a direct body read was cancelled halfway
                payload = await self._receive_body()
            else:
                payload = decoder.next_frame()  # raises WireError("oversize")
            length = decoder.pending_length
            if payload is None and length is not None:
                if not self._admitted:
                    await self._admit(decoder.pending_part, length, decoder.pending_total)
                if length >= DIRECT_BODY:
                    self._body_head = frame_header_size(decoder.pending_part)
                    self._body, self._body_got = decoder.detach_body()
                    payload = await self._receive_body()
            if payload is not None:
                self._admitted = False
                self._deadline = None
                if decoder.part is Part.WHOLE:
                    self._release()
                    return bytes(payload) if type(payload) is not bytes else payload
                # A part may stay a bytearray: the assembler joins the parts into bytes.
                message = self._parts.add(decoder.part, payload, decoder.total)  # type: ignore[arg-type]
                if message is None:
                    continue
                self._release_message()
                return message
            if length is None and self._deadline is None and decoder.buffered:
                # Part of a header: the header itself is on the clock.
                self._deadline = trio.current_time() + self._limits.frame_timeout
            # Never read past the end of this frame: whatever we hold is reserved.
            data = await self._receive_some(min(RECEIVE_CHUNK, decoder.wants()))
            if self._closed:
                # Closed while we waited: the partial frame is gone, so these bytes
                # would be parsed from the middle of a frame (a bogus "oversize").
                raise ConnectionClosed(f"connection to {self._peer_id} is closed")
            decoder.feed(data)

    async def _receive_body(self) -> bytearray:
        """The rest of the admitted frame's body, read straight into its buffer."""
        body = self._body
        assert body is not None
        got = self._body_got
        view = memoryview(body)
        try:
            while got < len(body):
                got += await self._receive_into(view[got:])
                self._body_got = got
                if self._closed:
                    raise ConnectionClosed(f"connection to {self._peer_id} is closed")
        finally:
            view.release()
        self._body, self._body_got = None, 0
        return body

    async def _receive_into(self, view: memoryview) -> int:
        """Fill the start of `view` with what arrives next (at least one byte)."""
        n = len(view)
        if self._tls is None:
            data = await self._receive_some(min(RECEIVE_CHUNK, n))
            view[: len(data)] = data
            return len(data)
        ssl_object, incoming, recv_lock = self._tls
        while True:
            got = self._decrypt_into(ssl_object, view)
            if got:
                return got
            # Nothing decrypted waits: one socket read, as large as the rest of the
            # frame (plus TLS record overhead, ~0.2%) up to RECEIVE_CHUNK, into the TLS
            # layer. Under the lock SSLStream itself holds for its transport reads.
            want = min(RECEIVE_CHUNK, n + n // 256 + 64)
            async with recv_lock:
                data = await self._receive_some(want, self._stream.transport_stream)
                incoming.write(data)
                self._stream._inner_recv_count += 1

    def _decrypt_into(self, ssl_object: ssl.SSLObject, view: memoryview) -> int:
        """Decrypt the records already received into `view`, without yielding."""
        got = 0
        n = len(view)
        while got < n:
            try:
                # With a buffer, read returns the byte count (typeshed says bytes).
                k = cast(int, ssl_object.read(n - got, view[got:]))
            except ssl.SSLWantReadError:  # no complete record left
                break
            except ssl.SSLError as exc:
                raise ConnectionClosed(f"connection to {self._peer_id} broke: {exc}") from exc
            if not k:  # close_notify
                if got:
                    break
                raise ConnectionClosed(f"{self._peer_id} closed the connection")
            got += k
        return got

    async def _admit(self, part: Part, length: int, total: int) -> None:
        """A frame's header is in: check it, and budget the frame (or, for a FIRST part,
        the whole message) before a byte of its body is read."""
        self._parts.expect(part, length, total)  # raises WireError("bad_part")
        if part is Part.WHOLE:
            self._reserved = await self._reserve(length)
            # The frame's clock starts once it may be read: waiting was our doing.
            self._deadline = trio.current_time() + self._limits.frame_deadline(length)
        elif part is Part.FIRST:
            self._message_reserved = await self._reserve(total)
            self._message_deadline = trio.current_time() + self._limits.frame_deadline(total)
            self._deadline = None
        else:
            self._deadline = None  # the message's deadline covers its parts
        self._admitted = True

    async def _reserve(self, length: int) -> int:
        wait = self._limits.budget_wait()
        with trio.move_on_after(wait) as scope:
            await self._budget.reserve(length)
        if scope.cancelled_caught:
            raise WireError(
                "receive_budget",
                f"no room for a {length}-byte frame in the {self._budget.capacity}-byte "
                f"receive budget within {wait:.0f}s",
            )
        return length

    async def _receive_some(
        self, n: int, stream: trio.abc.ReceiveStream | None = None
    ) -> bytes | bytearray:
        """Up to n bytes from the TLS stream (or, for a body read, the socket under it),
        within the deadlines of the frame and message in progress."""
        source = self._stream if stream is None else stream
        deadlines = [d for d in (self._deadline, self._message_deadline) if d is not None]
        try:
            if not deadlines:
                data = await source.receive_some(n)
            else:
                with trio.move_on_at(min(deadlines)) as scope:
                    data = await source.receive_some(n)
                if scope.cancelled_caught:
                    raise WireError("frame_deadline", self._late_detail())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection to {self._peer_id} lost: {exc}") from exc
        if not data:
            raise ConnectionClosed(f"{self._peer_id} closed the connection")
        if len(data) < n and stream is None:
            data = self._drain(data, n)
        # Bytes prove the peer alive even while one large frame takes longer than the
        # heartbeat timeout to arrive (a 40 MB update on a slow link).
        self.last_activity = trio.current_time()
        return data

    def _drain(self, data: bytes | bytearray, n: int) -> bytes | bytearray:
        """`data` plus whatever more of the n bytes the TLS layer can hand out right now.

        trio.SSLStream.receive_some returns one TLS record (16 KiB at most) per call and
        goes through the scheduler each time; a 1 MiB part would take 64 of those. What
        has already arrived in its incoming buffer is decrypted here in one go, without
        yielding, and never past n (the end of the frame in progress). Only this task
        receives on the stream, and SSLObject.read never sends, so nothing is reordered:
        anything a read leaves to send (a TLS 1.3 key update reply) goes out on the
        stream's next operation. Errors are left for the next receive_some to report
        the way trio does.
        """
        ssl_object = getattr(self._stream, "_ssl_object", None)
        incoming = getattr(self._stream, "_incoming", None)
        if ssl_object is None or incoming is None:
            return data
        pieces = [data]
        got = len(data)
        while got < n and (incoming.pending or ssl_object.pending()):
            try:
                more = ssl_object.read(n - got)
            except ssl.SSLError:  # incl. SSLWantReadError: a partial record
                break
            if not more:  # close_notify: the next receive_some returns b""
                break
            pieces.append(more)
            got += len(more)
        return data if len(pieces) == 1 else b"".join(pieces)

    def _late_detail(self) -> str:
        now = trio.current_time()
        if self._message_deadline is not None and now >= self._message_deadline:
            return (
                f"{self._peer_id} did not complete a {self._message_reserved}-byte message "
                f"in time ({self.buffered} bytes arrived)"
            )
        pending = self._decoder.pending_length if self._body is None else len(self._body)
        size = "its header" if pending is None else f"a {pending}-byte frame"
        return (
            f"{self._peer_id} did not complete {size} in time "
            f"({self._decoder.buffered + self._body_got} bytes arrived)"
        )

    def _release(self) -> None:
        if self._reserved:
            reserved, self._reserved = self._reserved, 0
            self._budget.release(reserved)

    def _release_message(self) -> None:
        self._message_deadline = None
        if self._message_reserved:
            reserved, self._message_reserved = self._message_reserved, 0
            self._budget.release(reserved)

    def _drop_partial(self) -> None:
        """Forget the frame and message in progress: their bytes and budget."""
        dropped = self.buffered
        self._decoder.clear()
        self._body, self._body_got, self._body_head = None, 0, 0
        self._parts.clear()
        self._admitted = False
        self._release()
        self._release_message()
        self._deadline = None
        give_back_memory(dropped)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._drop_partial()
        if self._on_close is not None:
            self._on_close(self)
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
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        limits: TransportLimits | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        """`limits` wins over the two shorthand arguments; `on_event` is told the name of
        every bound that refused something (the node counts them in its status)."""
        self.identity = identity
        self.federation = federation
        self.host = host
        self.port = port
        if limits is None:
            limits = TransportLimits(
                max_frame_size=max_frame_size, handshake_timeout=handshake_timeout
            )
        self.limits = limits
        self.budget = ReceiveBudget(limits.receive_budget)
        self.events: Counter[str] = Counter()
        self._on_event = on_event
        self._connections: set[TcpConnection] = set()
        self.handshake_failures = HandshakeFailures()
        self._inbound = 0
        self._last_refusal_log = -math.inf
        self._server_context = make_ssl_context(identity, federation, secret, server=True)
        self._client_context = make_ssl_context(identity, federation, secret, server=False)

    @property
    def local_id(self) -> str:
        return self.identity.peer_id

    @property
    def max_frame_size(self) -> int:
        return self.limits.max_frame_size

    @property
    def handshake_timeout(self) -> float:
        return self.limits.handshake_timeout

    def set_limits(self, limits: TransportLimits) -> None:
        self.limits = limits
        self.budget.resize(limits.receive_budget)

    @property
    def inbound(self) -> int:
        """Accepted connections open right now."""
        return self._inbound

    def buffered(self) -> int:
        """Bytes of partial frames held by all open connections (<= budget.used + 4 each)."""
        return sum(c.buffered for c in self._connections)

    def stats(self) -> dict[str, Any]:
        return {
            "inbound": self._inbound,
            "connections": len(self._connections),
            "buffered": self.buffered(),
            "receive_budget": self.budget.snapshot(),
            "refused": dict(self.events),
        }

    def _event(self, name: str) -> None:
        self.events[name] += 1
        if self._on_event is not None:
            self._on_event(name)

    def _handshake_failed(self, remote: str, reason: str) -> None:
        """Counted, kept by host with its reason for status, and logged."""
        self.handshake_failures.record(remote, reason, trio.current_time())
        self._event("inbound_handshake_failures")
        log_inbound_failure(remote, reason)

    def _connection(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        peer_id: str,
        remote: str,
        *,
        outbound: bool,
    ) -> TcpConnection:
        conn = TcpConnection(
            stream,
            peer_id,
            remote,
            outbound=outbound,
            limits=self.limits,
            budget=self.budget,
            on_close=self._connections.discard,
        )
        self._connections.add(conn)
        return conn

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
        deadline = trio.current_time() + self.handshake_timeout  # TLS, then our first byte
        try:
            with trio.fail_at(deadline):
                await ssl_stream.do_handshake()
                peer_id = peer_id_of(ssl_stream)
        except trio.TooSlowError:
            self._handshake_failed(remote, "timed out")
            await trio.aclose_forcefully(stream)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._handshake_failed(remote, tls_reason(exc))
            await send_alert(ssl_stream, stream)
            await trio.aclose_forcefully(stream)
            return
        except HandshakeError as exc:
            self._handshake_failed(remote, str(exc))
            await trio.aclose_forcefully(stream)
            return
        if self._inbound >= self.limits.max_inbound:
            with trio.move_on_at(deadline):
                await self._refuse(ssl_stream, peer_id, remote)
            await trio.aclose_forcefully(stream)
            return
        self._inbound += 1  # counted from here, so concurrent accepts cannot overshoot
        try:
            with trio.move_on_at(deadline) as accept_scope:
                await ssl_stream.send_all(ACCEPT)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._inbound -= 1
            self._handshake_failed(remote, tls_reason(exc))
            await trio.aclose_forcefully(stream)
            return
        if accept_scope.cancelled_caught:
            self._inbound -= 1
            self._handshake_failed(remote, "timed out")
            await trio.aclose_forcefully(stream)
            return
        conn = self._connection(ssl_stream, peer_id, remote, outbound=False)
        log.debug("accepted %r", conn)
        try:
            await handler(conn)
        except ConnectionClosed as exc:
            log.info("connection from %s ended: %s", peer_id, exc)
        except WireError as exc:
            log.warning("bad frame from %s (%s), closing: %s", peer_id, remote, exc)
        finally:
            self._inbound -= 1
            await conn.aclose()

    async def _refuse(
        self, ssl_stream: trio.SSLStream[trio.SocketStream], peer_id: str, remote: str
    ) -> None:
        """Over the inbound limit: say BUSY and hang up, one log line per interval."""
        self._event("inbound_refused")
        now = trio.current_time()
        if now - self._last_refusal_log >= REFUSAL_LOG_EVERY:
            self._last_refusal_log = now
            log.warning(
                "refused inbound connection from %s at %s: %d inbound connections open "
                "(max_inbound); %d refused so far",
                peer_id[:12],
                remote,
                self._inbound,
                self.events["inbound_refused"],
                extra=event(
                    "connection.refused",
                    peer=peer_id,
                    remote=remote,
                    reason="max_inbound",
                    refused=self.events["inbound_refused"],
                ),
            )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await ssl_stream.send_all(BUSY)

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
                # Exactly the accept byte: frames after it are read by the connection,
                # within its receive budget.
                first = await ssl_stream.receive_some(1)
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise HandshakeError(
                f"handshake with {address} timed out after {self.handshake_timeout}s"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if peer_id is None:
                await send_alert(ssl_stream, stream)
            await trio.aclose_forcefully(stream)
            if peer_id is None:
                msg = f"TLS handshake with {address} failed: {tls_reason(exc)}"
            else:
                msg = refused_text(peer_id, address, "closed the connection")
            raise HandshakeError(msg) from exc
        except HandshakeError:
            await trio.aclose_forcefully(stream)
            raise
        if first != ACCEPT:
            await trio.aclose_forcefully(stream)
            if first == BUSY:
                raise HandshakeError(
                    f"peer {peer_id} at {address} refused us: "
                    "it has as many inbound connections as it accepts (max_inbound)"
                )
            why = "closed the connection" if not first else "sent an unexpected first byte"
            raise HandshakeError(refused_text(peer_id, address, why))
        return self._connection(ssl_stream, peer_id, address, outbound=True)
