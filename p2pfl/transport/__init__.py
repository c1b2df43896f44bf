"""Transports: trio TCP + mutual TLS 1.3, and an in-memory twin for simulations."""

from p2pfl.transport.base import Connection, ConnectionClosed, HandshakeError, Transport

__all__ = ["Connection", "ConnectionClosed", "HandshakeError", "Transport"]
