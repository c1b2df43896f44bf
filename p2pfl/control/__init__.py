"""Local control endpoint of a node: a unix socket speaking one-line JSON, and its client.

Only stdlib constants live here, so that `p2pfl status` (which imports this package) stays
fast: the trio server is in `p2pfl.control.server`, imported by the node only.

Protocol (version 1), one request per connection:
    client -> server: `{"v": 1, "cmd": "status"}\\n`
    server -> client: `{"v": 1, "ok": true, "result": {...}}\\n` then close, or
                      `{"v": 1, "ok": false, "error": "..."}\\n` then close.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONTROL_PROTOCOL_VERSION = 1
"""Version of the control protocol spoken on the socket (independent of the wire protocol)."""

SOCKET_NAME = "control.sock"
"""File name of the control socket inside a node's data dir."""

MAX_REQUEST_BYTES = 64 * 1024
"""A request is a short command line; anything longer is refused unread."""

MAX_REPLY_BYTES = 16 * 1024 * 1024
"""Upper bound the client accepts, so a confused peer on the socket cannot exhaust memory."""

# sun_path is 108 bytes on Linux (104 on the BSDs/macOS), including the trailing NUL.
MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107


def socket_path_too_long(path: str | Path) -> str | None:
    """Why `path` cannot be a unix socket address, or None if it can.

    The kernel silently refuses (or truncates) long addresses; a deep `--data-dir` is the usual
    cause, so the message says what to do about it.
    """
    size = len(os.fsencode(path))
    if size <= MAX_SOCKET_PATH_BYTES:
        return None
    return (
        f"control socket path is {size} bytes, longer than the unix socket limit of "
        f"{MAX_SOCKET_PATH_BYTES} bytes: {path} (use a shorter --data-dir)"
    )


__all__ = [
    "CONTROL_PROTOCOL_VERSION",
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_SOCKET_PATH_BYTES",
    "SOCKET_NAME",
    "socket_path_too_long",
]
