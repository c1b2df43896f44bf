"""The interface every transport (TCP+TLS, in-memory, fault-injecting) offers the node.

A connection carries whole message payloads (bytes); framing is the transport's
business. Both ends of a connection know the other's authenticated peer id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class ConnectionClosed(Exception):
    """The peer went away (EOF, reset, or we closed it)."""


class HandshakeError(Exception):
    """The peer could not be authenticated, or proved an id other than the one dialed."""


class Connection(Protocol):
    @property
    def peer_id(self) -> str: ...

    @property
    def remote_address(self) -> str: ...

    @property
    def outbound(self) -> bool:
        """True if we dialed this connection."""
        ...

    async def send(self, payload: bytes) -> None:
        """Send one message payload. Raises ConnectionClosed if the peer is gone."""
        ...

    async def receive(self) -> bytes:
        """Return the next payload. Raises ConnectionClosed at EOF, WireError on bad frames."""
        ...

    async def aclose(self) -> None: ...


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Transport(Protocol):
    @property
    def local_id(self) -> str: ...

    async def listen(self, handler: ConnectionHandler, *, task_status: Any = ...) -> None:
        """Accept connections forever, running `handler(conn)` for each in its own task.

        Reports the list of "host:port" addresses it listens on via task_status.started().
        """
        ...

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        """Dial `address`; if `expected_peer_id` is given, refuse any other proven id."""
        ...
