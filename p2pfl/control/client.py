"""Blocking stdlib client for a node's control socket.

Stdlib only (socket + json) on purpose: `p2pfl status` must start in tens of milliseconds, and
trio/numpy alone would cost about a quarter of a second.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from p2pfl.control import (
    CONTROL_PROTOCOL_VERSION,
    MAX_REPLY_BYTES,
    SOCKET_NAME,
    socket_path_too_long,
)

DEFAULT_DATA_DIR = "~/.p2pfl"


class ControlError(Exception):
    """Any failure to get an answer; the message is written for the person at the terminal."""


def socket_path_for(data_dir: str | os.PathLike[str]) -> Path:
    """Where the node using `data_dir` serves its control socket."""
    return Path(data_dir).expanduser() / SOCKET_NAME


def _no_node(path: Path) -> ControlError:
    return ControlError(
        f"no p2pfl node is running with data dir {path.parent} (no control socket at {path})"
    )


def _connect(path: Path, deadline: float) -> socket.socket:
    problem = socket_path_too_long(path)
    if problem is not None:
        raise ControlError(problem)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _no_node(path) from None
    except OSError as exc:
        raise ControlError(f"cannot access control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a socket (is --data-dir/--socket right?)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.connect(os.fspath(path))
    except FileNotFoundError:
        sock.close()
        raise _no_node(path) from None
    except ConnectionRefusedError:
        sock.close()
        raise ControlError(f"node not running (stale socket at {path})") from None
    except PermissionError:
        sock.close()
        raise ControlError(
            f"permission denied on {path} (is the node running as another user?)"
        ) from None
    except TimeoutError:
        sock.close()
        raise ControlError(f"node at {path} did not accept the connection in time") from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock


def _exchange(sock: socket.socket, request: bytes, path: Path, deadline: float) -> bytes:
    """Send the request, read the reply until the server closes (or the first newline)."""
    chunks: list[bytes] = []
    size = 0
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(request)
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise ControlError(f"reply from {path} is larger than {MAX_REPLY_BYTES} bytes")
            if b"\n" in chunk:
                break
    except TimeoutError:
        raise ControlError(f"node at {path} did not answer in time") from None
    except OSError as exc:
        raise ControlError(f"connection to {path} failed: {exc.strerror or exc}") from None
    return b"".join(chunks)


def query(
    path: str | os.PathLike[str],
    cmd: str = "status",
    timeout: float = 3.0,
    *,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Send one command to the node at socket `path` and return its `result` object.

    `params` are extra request fields for commands that take arguments. Raises ControlError
    (with a readable message) for every way this can fail, including an ok=false reply.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    request = {**(params or {}), "v": CONTROL_PROTOCOL_VERSION, "cmd": cmd}
    line = (json.dumps(request, separators=(",", ":")) + "\n").encode("utf-8")
    with _connect(path, deadline) as sock:
        raw = _exchange(sock, line, path, deadline)
    if not raw.strip():
        raise ControlError(f"node at {path} closed the connection without answering")
    try:
        reply = json.loads(raw.split(b"\n", 1)[0].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"bad reply from node at {path}: {exc}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"bad reply from node at {path}: not a JSON object")
    if reply.get("v") != CONTROL_PROTOCOL_VERSION:
        raise ControlError(
            f"node at {path} speaks control protocol version {reply.get('v')!r}, "
            f"this p2pfl speaks {CONTROL_PROTOCOL_VERSION}"
        )
    if reply.get("ok") is not True:
        raise ControlError(f"node refused {cmd!r}: {reply.get('error', 'no reason given')}")
    result = reply.get("result")
    if not isinstance(result, dict):
        raise ControlError(f"bad reply from node at {path}: result is not a JSON object")
    return result


__all__ = ["DEFAULT_DATA_DIR", "ControlError", "query", "socket_path_for"]
