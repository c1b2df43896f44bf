"""The interface every transport (TCP+TLS, in-memory, fault-injecting) offers the node.

A connection carries whole message payloads (bytes); framing is the transport's
business. Both ends of a connection know the other's authenticated peer id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from p2pfl.wire.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_FRAME_SIZE,
    frame_deadline,
    frame_limit_for,
)

if TYPE_CHECKING:
    from p2pfl.config import NodeConfig

MiB = 1024 * 1024
MIN_RECEIVE_BUDGET = 16 * MiB
DEFAULT_MAX_INBOUND = 128  # 2 x the default max_peers
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_FRAME_TIMEOUT = 10.0
DEFAULT_FRAME_MIN_RATE = 64 * 1024  # bytes/s: 512 kbit/s, a slow but honest uplink


class ConnectionClosed(Exception):
    """The peer went away (EOF, reset, or we closed it)."""


class HandshakeError(Exception):
    """The peer could not be authenticated, or proved an id other than the one dialed."""


def default_receive_budget(max_frame_size: int) -> int:
    """Two largest frames (four dense updates) at once, and never less than 16 MiB.

    More frames than that wait for their turn (TCP backpressure holds the rest in the
    peers' send buffers), which costs an honest round little: the link, not the buffer,
    is what limits how fast updates arrive.
    """
    return max(2 * max_frame_size, MIN_RECEIVE_BUDGET)


@dataclass(frozen=True, slots=True)
class TransportLimits:
    """Every bound a transport puts on what its peers can make it hold, and for how long.

    The table in docs/security.md ("Resource bounds") lists them with their config
    fields; `from_config` is the one place those fields become numbers.
    """

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE  # bytes of one frame's payload
    receive_budget: int = 0  # bytes of partial frames across all links; 0 = default
    max_inbound: int = DEFAULT_MAX_INBOUND  # accepted connections open at once
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT  # TCP accept -> TLS done
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT  # floor of a frame's deadline
    frame_min_rate: float = DEFAULT_FRAME_MIN_RATE  # bytes/s a frame must keep up

    def __post_init__(self) -> None:
        if not 1 <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in [1, {MAX_FRAME_SIZE}]")
        if self.receive_budget == 0:
            object.__setattr__(self, "receive_budget", default_receive_budget(self.max_frame_size))
        if self.receive_budget < self.max_frame_size:
            raise ValueError(
                f"receive_budget ({self.receive_budget} bytes) cannot hold one frame of "
                f"max_frame_size ({self.max_frame_size} bytes)"
            )
        if self.max_inbound < 1:
            raise ValueError("max_inbound must be >= 1")
        if not (self.handshake_timeout > 0 and self.frame_timeout > 0):
            raise ValueError("handshake_timeout and frame_timeout must be > 0")
        if not self.frame_min_rate > 0:
            raise ValueError("frame_min_rate must be > 0")

    def frame_deadline(self, length: int) -> float:
        """Seconds a frame of `length` bytes may take once its header has arrived."""
        return frame_deadline(length, floor=self.frame_timeout, min_rate=self.frame_min_rate)

    def budget_wait(self) -> float:
        """Seconds a frame may wait for room in the receive budget before its connection
        is closed: every reservation ends within `frame_deadline(max_frame_size)` (the
        frame completes or its connection is cut), so twice that lets a frame through
        behind a full budget of stalled ones, while a budget held for longer than any
        honest transfer takes still ends in a closed connection and a log line."""
        return 2 * self.frame_deadline(self.max_frame_size)

    @classmethod
    def from_config(cls, config: NodeConfig, num_params: int) -> TransportLimits:
        """The limits of a node whose model has `num_params` parameters.

        "auto" frame limit: twice the dense update plus headers (`frame_limit_for`);
        "auto" budget: `default_receive_budget`; "auto" inbound cap: 2 x max_peers.
        Raises ConfigError when explicit values contradict each other.
        """
        from p2pfl.config import ConfigError

        frame = config.max_frame_size
        frame = frame_limit_for(num_params) if frame == "auto" else int(frame)
        budget = config.receive_budget
        budget = default_receive_budget(frame) if budget == "auto" else int(budget)
        if budget < frame:
            raise ConfigError(
                "receive_budget",
                f"{budget} bytes cannot hold one frame of max_frame_size ({frame} bytes)",
            )
        inbound = config.max_inbound
        inbound = 2 * config.max_peers if inbound == "auto" else int(inbound)
        return cls(
            max_frame_size=frame,
            receive_budget=budget,
            max_inbound=inbound,
            handshake_timeout=config.handshake_timeout,
            frame_timeout=config.frame_timeout,
            frame_min_rate=float(config.frame_min_rate),
        )


class ConnectionEnds:
    """Who is at the other end of a connection, fixed when it is made: the part of
    `Connection` every transport's connection class shares."""

    def __init__(self, peer_id: str, remote_address: str, *, outbound: bool) -> None:
        self._peer_id = peer_id
        self._remote_address = remote_address
        self._outbound = outbound

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def remote_address(self) -> str:
        return self._remote_address

    @property
    def outbound(self) -> bool:
        """True if we dialed this connection."""
        return self._outbound

    def __repr__(self) -> str:
        way = "to" if self._outbound else "from"
        return f"<{type(self).__name__} {way} {self._peer_id} at {self._remote_address}>"


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

    def set_limits(self, limits: TransportLimits) -> None:
        """Apply `limits` to every connection opened from now on (the node calls this
        once its model is built, which is what sizes the frame limit)."""
        ...

    async def listen(self, handler: ConnectionHandler, *, task_status: Any = ...) -> None:
        """Accept connections forever, running `handler(conn)` for each in its own task.

        Reports the list of "host:port" addresses it listens on via task_status.started().
        """
        ...

    async def connect(self, address: str, expected_peer_id: str | None = None) -> Connection:
        """Dial `address`; if `expected_peer_id` is given, refuse any other proven id."""
        ...
