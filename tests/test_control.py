"""Control socket: the sans-IO request/reply rules, the trio server and the stdlib client."""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from p2pfl.control import MAX_REQUEST_BYTES, SOCKET_NAME
from p2pfl.control.client import ControlError, query
from p2pfl.control.server import (
    ControlSocketInUse,
    RequestError,
    dispatch,
    parse_request,
    serve_control,
    to_jsonable,
)

PEER_A = "a1b2c3d4e5f6a7b8c9d0"
PEER_B = "ffeeddccbbaa99887766"


def sample_status() -> dict[str, Any]:
    """What a node hands the server: numpy values included, as a real node would."""
    return {
        "node": {
            "id": "0123456789abcdef",
            "version": "0.1.0",
            "listen": ["127.0.0.1:7000"],
            "federation": "lab",
            "uptime_s": np.float64(12.5),
            "pid": 4242,
            "data_dir": Path("/tmp/x"),
            "role": "honest",
        },
        "round": {"current": np.int64(3), "phase": "collecting", "target": 10},
        "model": {"version": 3, "hash": "deadbeef" * 4, "params": np.int32(650)},
        "last_aggregation": {
            "round": 2,
            "rule": "trimmed_mean",
            "inputs_used": 3,
            "senders": [PEER_A, PEER_B],
            "rejected": [{"peer": PEER_B, "reason": "norm"}],
            "timed_out": False,
        },
        "history": [
            {
                "round": 2,
                "accuracy": np.float32(0.5),
                "loss": float("nan"),
                "bytes_sent": 100,
                "bytes_received": 200,
                "seconds": 0.25,
                "peers_heard": 2,
            }
        ],
        "peers": [
            {
                "id": PEER_A,
                "address": "127.0.0.1:7001",
                "state": "connected",
                "found_via": "mdns",
                "last_seen_s": 0.5,
                "rtt_ms": 1.25,
                "bytes_in": 2048,
                "bytes_out": 1024,
                "rejected": 0,
            }
        ],
        "counters": {"frames_rejected": {"too_large": 1}, "reconnects": 2, "timeouts": 0},
        "extra": np.arange(3, dtype=np.int16),
    }


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private dir under /tmp: pytest's tmp_path can exceed the unix socket limit."""
    path = Path(tempfile.mkdtemp(prefix="p2c", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def raw_exchange(path: Path, data: bytes) -> dict[str, Any]:
    """Send bytes as-is (no client-side validation) and parse the one-line reply."""
    stream = await trio.open_unix_socket(os.fspath(path))
    async with stream:
        await stream.send_all(data)
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
    assert reply.endswith(b"\n")
    decoded: dict[str, Any] = json.loads(reply)
    return decoded


async def ask(path: Path, cmd: str = "status", timeout: float = 3.0) -> dict[str, Any]:
    return await trio.to_thread.run_sync(lambda: query(path, cmd, timeout))


# --- sans-IO ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "empty request"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"cmd": "status"}', "version None"),
        (b'{"v": 2, "cmd": "status"}', "version 2"),
        (b'{"v": true, "cmd": "status"}', "version True"),
        (b'{"v": 1}', "'cmd'"),
        (b'{"v": 1, "cmd": 7}', "'cmd'"),
    ],
)
def test_parse_request_rejects(line: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(line)


def test_parse_request_accepts_extra_fields() -> None:
    assert parse_request(b'{"v": 1, "cmd": "status", "x": 1}') == {"v": 1, "cmd": "status", "x": 1}


class Phase(enum.Enum):
    TRAINING = "training"


def test_to_jsonable_converts_node_values() -> None:
    converted = to_jsonable(
        {
            1: np.float32(0.5),
            "arr": np.array([[1.0, np.nan]], dtype=np.float32),
            "inf": float("inf"),
            "phase": Phase.TRAINING,
            "path": Path("/a/b"),
            "t": (np.int64(2), True),
            "raw": b"\x01\xff",
        }
    )
    assert converted == {
        "1": 0.5,
        "arr": [[1.0, None]],
        "inf": None,
        "phase": "training",
        "path": "/a/b",
        "t": [2, True],
        "raw": "01ff",
    }
    assert type(converted["t"][0]) is int
    json.dumps(converted, allow_nan=False)
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"bad": object()})


async def test_dispatch_unknown_command_lists_known() -> None:
    reply = await dispatch(b'{"v": 1, "cmd": "nope"}', {"status": lambda r: {}})
    assert reply == {"v": 1, "ok": False, "error": "unknown command 'nope' (known: status)"}


async def test_dispatch_unencodable_result_is_an_error() -> None:
    reply = await dispatch(b'{"v": 1, "cmd": "status"}', {"status": lambda r: {"x": object()}})
    assert reply["ok"] is False
    assert "TypeError" in reply["error"]


async def test_dispatch_passes_request_and_awaits_async_handlers() -> None:
    async def echo(request: dict[str, Any]) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return {"got": request}

    reply = await dispatch(b'{"v": 1, "cmd": "echo", "arg": 5}', {"echo": echo})
    assert reply == {"v": 1, "ok": True, "result": {"got": {"v": 1, "cmd": "echo", "arg": 5}}}


# --- server + client over a real unix socket -------------------------------------------------


async def test_status_round_trip_and_socket_hygiene(sock_dir: Path) -> None:
    path = sock_dir / SOCKET_NAME
    async with trio.open_nursery() as nursery:
        started = await nursery.start(serve_control, path, {"status": lambda r: sample_status()})
        assert started == path
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        # No temp directory left behind by the private bind.
        assert sorted(p.name for p in sock_dir.iterdir()) == [SOCKET_NAME]

        result = await ask(path)
        assert result == json.loads(json.dumps(to_jsonable(sample_status())))
        assert result["round"]["current"] == 3
        assert result["history"][0]["accuracy"] == 0.5
        assert result["history"][0]["loss"] is None
        assert result["extra"] == [0, 1, 2]
        assert result["node"]["data_dir"] == "/tmp/x"
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_creates_missing_data_dir_private(sock_dir: Path) -> None:
    path = sock_dir / "d" / SOCKET_NAME
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda r: {"a": 1}})
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert await ask(path) == {"a": 1}
        nursery.cancel_scope.cancel()


async def test_bad_requests_are_answered_and_server_keeps_serving(sock_dir: Path) -> None:
    path = sock_dir / SOCKET_NAME
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda r: {"fine": True}})
        for data, message in [
            (b"not json\n", "not valid JSON"),
            (b'{"v": 2, "cmd": "status"}\n', "version 2"),
            (b'{"v": 1, "cmd": "reboot"}\n', "unknown command 'reboot'"),
            (b"x" * (MAX_REQUEST_BYTES + 10), "longer than"),
        ]:
            reply = await raw_exchange(path, data)
            assert reply["v"] == 1
            assert reply["ok"] is False
            assert message in reply["error"]
        # A request without the trailing newline but followed by EOF is still served.
        stream = await trio.open_unix_socket(os.fspath(path))
        async with stream:
            await stream.send_all(b'{"v": 1, "cmd": "status"}')
            await stream.send_eof()
            reply_bytes = await stream.receive_some(65536)
        assert json.loads(reply_bytes) == {"v": 1, "ok": True, "result": {"fine": True}}
        assert await ask(path) == {"fine": True}
        with pytest.raises(ControlError, match="unknown command 'reboot'"):
            await ask(path, "reboot")
        nursery.cancel_scope.cancel()


async def test_handler_exception_is_reported_and_logged(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sock_dir / SOCKET_NAME

    def boom(request: dict[str, Any]) -> Any:
        raise RuntimeError("disk on fire")

    handlers = {"status": lambda r: {"alive": 1}, "boom": boom}
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, handlers)
        with (
            caplog.at_level(logging.ERROR, logger="p2pfl.control"),
            pytest.raises(ControlError, match="RuntimeError: disk on fire"),
        ):
            await ask(path, "boom")
        assert any(r.name == "p2pfl.control" and r.exc_info for r in caplog.records)
        assert await ask(path) == {"alive": 1}
        nursery.cancel_scope.cancel()


async def test_silent_client_times_out_without_blocking_others(
    sock_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = sock_dir / SOCKET_NAME
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_control, io_timeout=5.0)
        await nursery.start(serve, path, {"status": lambda r: {}})
        silent = await trio.open_unix_socket(os.fspath(path))
        async with silent:
            # A second client is answered while the first one holds its connection open.
            assert (await raw_exchange(path, b'{"v":1,"cmd":"status"}\n'))["ok"] is True
            reply = json.loads(await silent.receive_some(65536))
        assert reply["ok"] is False
        assert "no request received within 5 s" in reply["error"]
        nursery.cancel_scope.cancel()


async def test_stale_socket_is_detected_and_replaced(sock_dir: Path) -> None:
    path = sock_dir / SOCKET_NAME
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(path))
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with pytest.raises(ControlError, match=r"node not running \(stale socket"):
        await ask(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda r: {"new": 1}})
        assert await ask(path) == {"new": 1}
        nursery.cancel_scope.cancel()


async def test_second_node_on_same_data_dir_is_refused(sock_dir: Path) -> None:
    path = sock_dir / SOCKET_NAME
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda r: {"first": 1}})
        with (
            pytest.raises(ControlSocketInUse, match="another node is running with this data dir"),
            trio.fail_after(10),  # a broken check would serve forever instead of raising
        ):
            await serve_control(path, {"status": lambda r: {"second": 1}})
        # The loser must not have removed the winner's socket.
        assert await ask(path) == {"first": 1}
        nursery.cancel_scope.cancel()


async def test_replaced_socket_file_is_not_removed_on_exit(sock_dir: Path) -> None:
    path = sock_dir / SOCKET_NAME
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda r: {}})
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(os.fspath(path))
        nursery.cancel_scope.cancel()
    other.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


async def test_refuses_to_replace_a_regular_file(sock_dir: Path) -> None:
    path = sock_dir / SOCKET_NAME
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await serve_control(path, {})
    assert path.read_text() == "precious"
    with pytest.raises(ControlError, match="is not a socket"):
        await ask(path)


async def test_overlong_path_is_a_clear_value_error(sock_dir: Path) -> None:
    path = sock_dir / ("d" * 120) / SOCKET_NAME
    with pytest.raises(ValueError, match=r"unix socket limit .*shorter --data-dir"):
        await serve_control(path, {})
    with pytest.raises(ControlError, match="shorter --data-dir"):
        query(path)


def test_query_without_node_names_the_data_dir(sock_dir: Path) -> None:
    with pytest.raises(ControlError) as info:
        query(sock_dir / "nope" / SOCKET_NAME)
    assert str(info.value) == (
        f"no p2pfl node is running with data dir {sock_dir / 'nope'} "
        f"(no control socket at {sock_dir / 'nope' / SOCKET_NAME})"
    )


def test_query_times_out_on_a_server_that_never_answers(sock_dir: Path) -> None:
    path = sock_dir / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(os.fspath(path))
        mute.listen(1)  # connect succeeds via the backlog; nobody ever reads or writes
        with pytest.raises(ControlError, match="did not answer in time"):
            query(path, timeout=0.05)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", "closed the connection without answering"),
        (b"garbage\n", "bad reply"),
        (b"[1]\n", "not a JSON object"),
        (b'{"v": 9, "ok": true, "result": {}}\n', "control protocol version 9"),
        (b'{"v": 1, "ok": false, "error": "busy"}\n', "node refused 'status': busy"),
        (b'{"v": 1, "ok": true, "result": 3}\n', "result is not a JSON object"),
    ],
)
async def test_query_rejects_bad_replies(sock_dir: Path, reply: bytes, message: str) -> None:
    path = sock_dir / SOCKET_NAME
    listener_sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener_sock.bind(os.fspath(path))
    listener_sock.listen(1)
    listener = trio.SocketListener(listener_sock)

    async def answer_once() -> None:
        async with await listener.accept() as stream:
            await stream.receive_some(65536)
            await stream.send_all(reply)

    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(answer_once)
        with pytest.raises(ControlError, match=message):
            await ask(path)
