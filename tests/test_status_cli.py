"""`p2pfl status`: argument handling, output modes, rendering, and import lightness."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console

from p2pfl.control import SOCKET_NAME
from p2pfl.control.render import (
    fmt_bytes,
    fmt_duration,
    render_status,
)
from p2pfl.control.server import serve_control
from p2pfl.control.status_cli import add_status_arguments, run_status, socket_path, watch_status

PEER_A = "a1b2c3d4e5f6a7b8c9d0e1f2"
PEER_B = "99887766554433221100ffee"
NODE_ID = "n0d3n0d3n0d3n0d3n0d3"

FULL_STATUS: dict[str, Any] = {
    "node": {
        "id": NODE_ID,
        "version": "0.1.0",
        "listen": ["127.0.0.1:7000", "[::1]:7000"],
        "federation": "lab-fed",
        "uptime_s": 3723.0,
        "pid": 4242,
        "data_dir": "/home/u/.p2pfl",
        "role": "honest",
    },
    "round": {"current": 7, "phase": "collecting", "target": 20},
    "model": {"version": 7, "hash": "cafebabe" * 8, "params": 650},
    "last_aggregation": {
        "round": 6,
        "rule": "trimmed_mean",
        "inputs_used": 4,
        "senders": [PEER_A, PEER_B],
        "rejected": [{"peer": PEER_B, "reason": "stale_round"}],
        "timed_out": True,
    },
    "history": [
        {
            "round": 6,
            "accuracy": 0.9123,
            "loss": 0.31,
            "bytes_sent": 5 * 1024 * 1024,
            "bytes_received": 2048,
            "seconds": 1.5,
            "peers_heard": 3,
        }
    ],
    "peers": [
        {
            "id": PEER_A,
            "address": "127.0.0.1:7001",
            "state": "connected",
            "found_via": "mdns",
            "last_seen_s": 0.4,
            "rtt_ms": 0.8,
            "bytes_in": 1536,
            "bytes_out": 3 * 1024 * 1024,
            "rejected": 0,
        },
        {"id": PEER_B, "state": "dead"},
    ],
    "counters": {"frames_rejected": {"too_large": 2, "bad_msgpack": 1}, "reconnects": 4},
}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private dir under /tmp: pytest's tmp_path can exceed the unix socket limit."""
    path = Path(tempfile.mkdtemp(prefix="p2s", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node_socket(sock_dir: Path) -> AsyncIterator[Path]:
    """A control server answering `status` with FULL_STATUS, as a node would."""
    path = sock_dir / SOCKET_NAME
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": lambda r: FULL_STATUS})
        yield path
        nursery.cancel_scope.cancel()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="p2pfl status")
    add_status_arguments(parser)
    return parser.parse_args(argv)


def render_text(status: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_status(status))
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


# --- arguments -------------------------------------------------------------------------------


def test_arguments_defaults_and_socket_resolution(tmp_path: Path) -> None:
    args = parse()
    assert (args.json, args.watch, args.interval, args.socket) == (False, False, 1.0, None)
    assert socket_path(args) == Path("~/.p2pfl").expanduser() / SOCKET_NAME
    assert socket_path(parse("--data-dir", str(tmp_path))) == tmp_path / SOCKET_NAME
    both = parse("--data-dir", str(tmp_path), "--socket", "/run/x.sock")
    assert socket_path(both) == Path("/run/x.sock")


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_interval_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("--watch", "--interval", value)
    assert info.value.code == 2
    assert "--interval" in capsys.readouterr().err


# --- run_status ------------------------------------------------------------------------------


async def test_json_output_is_the_raw_status(
    node_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--socket", str(node_socket), "--json")
    assert await trio.to_thread.run_sync(run_status, args) == 0
    assert json.loads(capsys.readouterr().out) == FULL_STATUS


async def test_table_output_via_data_dir(
    node_socket: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    args = parse("--data-dir", str(node_socket.parent))
    assert await trio.to_thread.run_sync(run_status, args) == 0
    out = capsys.readouterr().out
    assert PEER_A[:12] in out
    assert PEER_B[:12] in out
    assert "collecting" in out


def test_no_node_exits_1_with_readable_message(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(socket="/nonexistent/control.sock", json=False, watch=False)
    assert run_status(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "p2pfl status: no p2pfl node is running with data dir /nonexistent "
        "(no control socket at /nonexistent/control.sock)\n"
    )


def test_stale_socket_exits_1(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = sock_dir / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(os.fspath(path))
    assert run_status(parse("--data-dir", str(sock_dir), "--json")) == 1
    assert "node not running (stale socket" in capsys.readouterr().err


class StopAfter:
    """A fake sleep that presses Ctrl-C on its n-th call."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.intervals: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.intervals.append(seconds)
        if len(self.intervals) >= self.calls:
            raise KeyboardInterrupt


async def test_watch_redraws_until_ctrl_c(node_socket: Path) -> None:
    out = io.StringIO()
    sleep = StopAfter(2)
    code = await trio.to_thread.run_sync(
        lambda: watch_status(
            node_socket, interval=0.5, timeout=3.0, as_json=False, sleep=sleep, out=out
        )
    )
    assert code == 0
    assert sleep.intervals == [0.5, 0.5]
    assert PEER_A[:12] in out.getvalue()


async def test_watch_json_prints_one_line_per_refresh(node_socket: Path) -> None:
    out = io.StringIO()
    code = await trio.to_thread.run_sync(
        lambda: watch_status(
            node_socket, interval=1.0, timeout=3.0, as_json=True, sleep=StopAfter(3), out=out
        )
    )
    assert code == 0
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [FULL_STATUS] * 3


def test_watch_shows_unreachable_node_instead_of_failing(sock_dir: Path) -> None:
    out = io.StringIO()
    path = sock_dir / SOCKET_NAME
    code = watch_status(path, interval=1.0, timeout=1.0, as_json=False, sleep=StopAfter(1), out=out)
    assert code == 0
    assert "no p2pfl node is running" in out.getvalue()


# --- rendering -------------------------------------------------------------------------------


def test_render_full_status() -> None:
    text = render_text(FULL_STATUS)
    for expected in [
        NODE_ID,
        PEER_A[:12],
        PEER_B[:12],
        "lab-fed",
        "127.0.0.1:7000, [::1]:7000",
        "1h 02m 03s",
        "7/20",
        "collecting",
        "trimmed_mean",
        f"1 ({PEER_B[:12]}: stale_round)",
        "timed out",
        "0.9123",
        "1.5 KiB",
        "3.0 MiB",
        "frames rejected 3 (too_large 2, bad_msgpack 1)",
        "reconnects 4",
        "0.4s",
    ]:
        assert expected in text, expected
    assert PEER_A not in text  # ids are shortened to 12 characters
    assert "asynchronous" not in text
    asynchronous = {**FULL_STATUS, "round": {**FULL_STATUS["round"], "mode": "async"}}
    assert "7/20  (collecting, asynchronous)" in render_text(asynchronous)


@pytest.mark.parametrize(
    "status",
    [
        {},
        {"node": None, "peers": None, "history": [], "counters": None},
        {"node": 5, "peers": "abc", "round": [], "counters": {"x": {"y": "z"}}},
        {"peers": [{"id": PEER_A, "rtt_ms": float("nan"), "bytes_in": -1}, 7]},
    ],
)
def test_render_tolerates_missing_and_odd_fields(status: dict[str, Any]) -> None:
    text = render_text(status)
    assert "p2pfl node -" in text
    assert "peers (" in text
    if status.get("peers") and isinstance(status["peers"], list):
        assert PEER_A[:12] in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB"), (None, "-")],
)
def test_fmt_bytes(value: Any, expected: str) -> None:
    assert fmt_bytes(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(12.34, "12.3s"), (65, "1m 05s"), (3723, "1h 02m 03s"), (2 * 86400 + 3 * 3600, "2d 03h")],
)
def test_fmt_duration(value: float, expected: str) -> None:
    assert fmt_duration(value) == expected


# --- import lightness ------------------------------------------------------------------------


def test_status_path_imports_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "import p2pfl.control.status_cli, p2pfl.control.client, p2pfl.control.render\n"
        "heavy = sorted(m for m in ('trio', 'numpy', 'zeroconf') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.strip() == ""


def test_render_shows_the_event_loops_worst_stall() -> None:
    status = {
        **FULL_STATUS,
        "event_loop": {
            "task_steps": 100,
            "max_step_ms": 812.5,
            "steps_over_100ms": 2,
            "recent_stalls": [
                {"ms": 120.0, "task": "p2pfl.node.mesh.Mesh._dial"},
                {"ms": 812.5, "task": "p2pfl.node.daemon.Node._train"},
            ],
        },
    }
    text = render_text(status)
    assert "longest step 812.5 ms" in text
    assert "recent stall 812.5 ms in p2pfl.node.daemon.Node._train" in text
    odd = render_text({**FULL_STATUS, "event_loop": {"recent_stalls": [None, {"ms": "x"}]}})
    assert "event loop" in odd


def test_render_shows_records_only_when_they_fall_behind() -> None:
    quiet = {"queued": 1, "evaluations_skipped": 0, "checkpoints_superseded": 0}
    assert "records" not in render_text({**FULL_STATUS, "records": quiet})
    behind = {"queued": 7, "evaluations_skipped": 12, "checkpoints_superseded": 5}
    text = render_text({**FULL_STATUS, "records": behind})
    assert "12 evaluations skipped" in text and "5 checkpoints superseded" in text
    assert "records" in render_text({**FULL_STATUS, "records": {"evaluations_skipped": "x"}})


def test_memory_status_reports_the_process() -> None:
    """RSS from /proc where there is one, and Python's allocated blocks, which move with
    Python objects (the soak compares both to tell a leak from allocator growth)."""
    from p2pfl.node.status import memory_status

    before = memory_status()
    hoard = [object() for _ in range(50_000)]
    after = memory_status()
    assert after["python_blocks"] is not None and before["python_blocks"] is not None
    assert after["python_blocks"] - before["python_blocks"] >= 40_000
    assert after["threads"] is not None and after["threads"] >= 1
    if sys.platform == "linux":
        assert after["rss_bytes"] is not None and after["rss_bytes"] > 10 * 2**20
    del hoard


# --- watching into a pipe, offline status, history, per-peer round --------------------------


async def test_watch_into_a_pipe_prints_one_line_per_change(node_socket: Path) -> None:
    out = io.StringIO()
    code = await trio.to_thread.run_sync(
        lambda: watch_status(
            node_socket,
            interval=1.0,
            timeout=3.0,
            as_json=False,
            sleep=StopAfter(3),
            out=out,
            lines=True,
        )
    )
    assert code == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # three polls of an unchanged node: one line
    assert NODE_ID[:12] in lines[0] and "round" in lines[0] and "\x1b" not in lines[0]


def test_watch_into_a_pipe_says_when_the_node_goes_away(sock_dir: Path) -> None:
    out = io.StringIO()
    code = watch_status(
        sock_dir / SOCKET_NAME, interval=1.0, timeout=1.0, as_json=False,
        sleep=StopAfter(2), out=out, lines=True,
    )  # fmt: skip
    assert code == 0
    assert out.getvalue().count("unreachable") == 1


def test_offline_status_reads_a_stopped_nodes_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pfl.identity import Identity

    ident = Identity.load_or_create(tmp_path)
    rows = [{"round": r, "accuracy": 0.5 + 0.1 * r, "loss": 1.0 / (r + 1)} for r in range(4)]
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + '\n{"round": 4, "accu'  # cut by a crash
    )
    assert run_status(parse("--data-dir", str(tmp_path), "--offline", "--json")) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["node"]["id"] == ident.peer_id and status["node"]["state"] == "stopped"
    assert status["round"]["last_metrics_round"] == 3 and len(status["history"]) == 4
    assert "1 unreadable line" in status["node"]["problems"][0]
    monkeypatch.setenv("COLUMNS", "200")
    assert run_status(parse("--data-dir", str(tmp_path), "--offline")) == 0
    out = capsys.readouterr().out
    assert "STOPPED" in out and "accuracy" in out and "▁" in out and "█" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_status(parse("--data-dir", str(empty), "--offline")) == 1
    assert "holds no p2pfl node" in capsys.readouterr().err


def test_status_shows_each_peers_round_and_a_history_sparkline() -> None:
    from p2pfl.control.render import history_text, sparkline

    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([2.0, 2.0]) == "▄▄"
    history = [{"round": r, "accuracy": a} for r, a in enumerate((0.2, 0.6, 0.9))]
    assert history_text(history) == "accuracy ▁▅█ 0.200 -> 0.900 (last 3 rounds)"
    status = {**FULL_STATUS, "peers": [{**FULL_STATUS["peers"][0], "round": 41}]}
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(render_status(status))
    header = next(line for line in out.getvalue().splitlines() if " rnd " in f" {line} ")
    assert "rnd" in header and " 41 " in out.getvalue()


async def test_status_names_failing_dial_targets_with_their_error_and_retry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from test_node_inmemory import make_nodes

    from p2pfl.transport.memory import MemoryNetwork

    (node,) = make_nodes(tmp_path, 1, MemoryNetwork(), rounds=1, total=2)  # n1 never starts
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await trio.sleep(30)
        status = node.status()
        nursery.cancel_scope.cancel()
    (target,) = status["dial_targets"]
    assert target["address"] == "mem:n1" and target["failures"] >= 2
    assert target["last_error"] and not target["connected"]
    assert target["retry_in_s"] is None or target["retry_in_s"] >= 0
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(render_status(status))
    text = out.getvalue()
    assert "dial mem:n1" in text and "failures" in text and target["last_error"][:20] in text
