"""trio server for the control socket: answers one JSON request per connection.

The node owns the state; this module only moves a request line in and a reply line out, so a
slow, malformed or hostile local client can never disturb the node (bounded size, read timeout,
every failure turned into an `ok: false` reply).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import trio

from p2pfl.control import (
    CONTROL_PROTOCOL_VERSION,
    MAX_REQUEST_BYTES,
    socket_path_too_long,
)
from p2pfl.datadir import os_error
from p2pfl.fatal import DataDirInUse, DataDirUnusable, FatalError

logger = logging.getLogger("p2pfl.control")

Handler = Callable[[dict[str, Any]], Any]
"""Gets the whole request object; returns a JSON-able result (or an awaitable of one)."""

DEFAULT_IO_TIMEOUT = 5.0
LISTEN_BACKLOG = 16
_PROBE_TIMEOUT = 1.0
_SOCKET_MODE = 0o600


class ControlSocketInUse(DataDirInUse, RuntimeError):
    """A live node already answers on this socket: two nodes must not share one data dir."""


class ControlSocketPathTooLong(DataDirUnusable, ValueError):
    """The socket path does not fit in a unix socket address (a deep data dir)."""


class ControlSocketBlocked(DataDirUnusable, FileExistsError):
    """Something that is not a socket sits where the control socket goes; never replaced."""


class RequestError(ValueError):
    """A request the server cannot act on; the message is sent back to the client verbatim."""


# --- sans-IO protocol -----------------------------------------------------------------------


def parse_request(line: bytes) -> dict[str, Any]:
    """Validate one request line; raises RequestError with a message meant for the client."""
    if not line.strip():
        raise RequestError("empty request")
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"request is not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    version = obj.get("v")
    if isinstance(version, bool) or version != CONTROL_PROTOCOL_VERSION:
        raise RequestError(
            f"unsupported control protocol version {version!r} "
            f"(this node speaks {CONTROL_PROTOCOL_VERSION})"
        )
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise RequestError("request needs a non-empty 'cmd' string")
    return obj


def ok_reply(result: Any) -> dict[str, Any]:
    return {"v": CONTROL_PROTOCOL_VERSION, "ok": True, "result": result}


def error_reply(message: str) -> dict[str, Any]:
    return {"v": CONTROL_PROTOCOL_VERSION, "ok": False, "error": message}


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values from what a node naturally holds (numpy scalars/arrays, paths, enums).

    Non-finite floats become null: bare NaN is not JSON and would break `p2pfl status --json | jq`.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """One compact JSON line; `reply` must already be JSON-able (see `to_jsonable`)."""
    return (json.dumps(reply, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")


async def dispatch(line: bytes, handlers: Mapping[str, Handler]) -> dict[str, Any]:
    """Turn a request line into a reply object; never raises for a bad request or handler."""
    try:
        request = parse_request(line)
    except RequestError as exc:
        return error_reply(str(exc))
    cmd: str = request["cmd"]
    handler = handlers.get(cmd)
    if handler is None:
        known = ", ".join(sorted(handlers)) or "none"
        return error_reply(f"unknown command {cmd!r} (known: {known})")
    try:
        result = handler(request)
        if inspect.isawaitable(result):
            result = await result
        # Encoding problems are the handler's bug too: convert here so they are reported.
        return ok_reply(to_jsonable(result))
    except Exception as exc:
        logger.exception("control command %r failed", cmd)
        return error_reply(f"command {cmd!r} failed: {type(exc).__name__}: {exc}")


# --- I/O ------------------------------------------------------------------------------------


async def _read_request(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    """Bytes up to the first newline (or EOF); RequestError past `limit` bytes."""
    buf = bytearray()
    while True:
        chunk = await stream.receive_some(limit + 1 - len(buf))
        if not chunk:
            return bytes(buf)
        newline = chunk.find(b"\n")
        if newline >= 0:
            buf += chunk[:newline]
        else:
            buf += chunk
        if len(buf) > limit:
            raise RequestError(f"request longer than {limit} bytes")
        if newline >= 0:
            return bytes(buf)


async def _drain(stream: trio.abc.ReceiveStream, budget: int) -> None:
    while budget > 0:
        chunk = await stream.receive_some(min(budget, 65536))
        if not chunk:
            return
        budget -= len(chunk)


async def _serve_client(
    stream: trio.SocketStream,
    handlers: Mapping[str, Handler],
    io_timeout: float,
    max_request_bytes: int,
) -> None:
    try:
        reply: dict[str, Any] | None = None
        line = b""
        oversized = False
        with trio.move_on_after(io_timeout) as scope:
            try:
                line = await _read_request(stream, max_request_bytes)
            except RequestError as exc:
                reply = error_reply(str(exc))
                oversized = True
        if scope.cancelled_caught:
            reply = error_reply(f"no request received within {io_timeout:g} s")
        if reply is None:
            reply = await dispatch(line, handlers)
        with trio.move_on_after(io_timeout):
            await stream.send_all(encode_reply(reply))
            if oversized:
                # Closing with unread input makes the kernel reset the connection, and the
                # client would lose our explanation: swallow a bounded amount first.
                await stream.send_eof()
                await _drain(stream, 4 * max_request_bytes)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        logger.debug("control client went away")
    except Exception:
        # A bug here must cost one client its answer, never the node its control socket.
        logger.exception("control connection failed")


async def _answers(path: Path) -> bool:
    """Is a live server listening at `path`? (A full backlog also counts as alive.)"""
    probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with probe:
        with trio.move_on_after(_PROBE_TIMEOUT):
            try:
                await probe.connect(os.fspath(path))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
        return True


async def _clear_stale(path: Path) -> None:
    """Remove a socket file left by a dead node; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketBlocked(
            f"{path} exists and is not a socket; refusing to replace it: move it out of the way"
        )
    if await _answers(path):
        raise ControlSocketInUse(
            f"another node is running with this data dir ({path.parent}): its control socket "
            f"{path} answers; stop that node, or give this one another --data-dir"
        )
    logger.info("removing stale control socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _bind_private(sock: trio.socket.SocketType, path: Path) -> os.stat_result:
    """Bind `sock` at `path` so that no other user can ever connect, even for a moment.

    umask is process-wide (racy with zeroconf's and trio's worker threads), so instead the
    socket is bound inside a fresh 0700 directory, chmod-ed 0600 there, then hard-linked into
    place; link() also fails rather than clobbers if another node won the race.
    """
    tmpdir = tempfile.mkdtemp(prefix=".", dir=path.parent)
    tmp = os.path.join(tmpdir, "s")
    try:
        if socket_path_too_long(tmp) is not None:
            # Only reachable for socket names shorter than the temp name; the data dir is
            # meant to be 0700 anyway, so the moment before chmod is still private.
            await sock.bind(os.fspath(path))
            os.chmod(path, _SOCKET_MODE)
            return os.stat(path)
        await sock.bind(tmp)
        os.chmod(tmp, _SOCKET_MODE)
        for _ in range(3):
            try:
                os.link(tmp, path)
                return os.stat(path)
            except FileExistsError:
                await _clear_stale(path)
            except OSError:  # filesystem without hard links
                os.replace(tmp, path)
                return os.stat(path)
        raise ControlSocketInUse(f"control socket {path} keeps being recreated by someone else")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)


def _unlink_if_ours(path: Path, ours: os.stat_result) -> None:
    """Remove the socket file unless another node has replaced it since."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def serve_control(
    path: str | os.PathLike[str],
    handlers: Mapping[str, Handler],
    *,
    io_timeout: float = DEFAULT_IO_TIMEOUT,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handlers` on a unix socket at `path` until cancelled; reports `path` when ready.

    Raises ControlSocketPathTooLong (a ValueError) for a path over the unix socket limit,
    ControlSocketInUse if a live node already serves `path`, and a FatalError with one line
    to act on for any other local failure (read-only, permissions, disk full). The socket
    file is removed on exit.
    """
    path = Path(path)
    problem = socket_path_too_long(path)
    if problem is not None:
        raise ControlSocketPathTooLong(problem)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            await _clear_stale(path)
            ours = await _bind_private(sock, path)
        except FatalError:
            raise
        except OSError as exc:
            raise os_error(exc, path, "create control socket") from None
        try:
            sock.listen(LISTEN_BACKLOG)
            listener = trio.SocketListener(sock)

            async def handle(stream: trio.SocketStream) -> None:
                await _serve_client(stream, handlers, io_timeout, max_request_bytes)

            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, handle, [listener])
                logger.debug("control socket listening at %s", path)
                task_status.started(path)
        finally:
            _unlink_if_ours(path, ours)


__all__ = [
    "ControlSocketBlocked",
    "ControlSocketInUse",
    "ControlSocketPathTooLong",
    "Handler",
    "RequestError",
    "dispatch",
    "encode_reply",
    "error_reply",
    "ok_reply",
    "parse_request",
    "serve_control",
    "to_jsonable",
]
