"""Transports: trio TCP + mutual TLS 1.3, and an in-memory twin for simulations.

The concrete transports are imported lazily: they pull in trio and cryptography, which
a light command such as `p2pfl status` should not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from p2pfl.transport.base import Connection, ConnectionClosed, HandshakeError, Transport

if TYPE_CHECKING:
    from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
    from p2pfl.transport.tcp import TcpTransport, format_address, parse_address

_LAZY = {
    "TcpTransport": "p2pfl.transport.tcp",
    "parse_address": "p2pfl.transport.tcp",
    "format_address": "p2pfl.transport.tcp",
    "MemoryNetwork": "p2pfl.transport.memory",
    "MemoryTransport": "p2pfl.transport.memory",
}

__all__ = [
    "Connection",
    "ConnectionClosed",
    "HandshakeError",
    "MemoryNetwork",
    "MemoryTransport",
    "TcpTransport",
    "Transport",
    "format_address",
    "parse_address",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
