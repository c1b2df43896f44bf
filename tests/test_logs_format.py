"""Log formats (docs/operations.md, "Logs"): ISO-8601 times to the millisecond in both,
one JSON object per line with stable keys and event names in `--log-format json`, no
secrets in either; and the one unit convention for bytes (p2pfl.units)."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl import logs
from p2pfl.cli import main
from p2pfl.config import ConfigError, build_config, coerce, load_config_file
from p2pfl.identity import Identity
from p2pfl.logs import JsonFormatter, TextFormatter, event, setup_logging
from p2pfl.transport.base import HandshakeError
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from p2pfl.transport.tcp import TcpTransport
from p2pfl.units import format_bytes

STABLE_KEYS = ("ts", "level", "logger", "event", "msg")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")


def _record(
    msg: str = "hello %s",
    args: tuple[Any, ...] = ("world",),
    *,
    name: str = "p2pfl.node",
    level: int = logging.INFO,
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
) -> logging.LogRecord:
    record = logging.getLogger(name).makeRecord(
        name, level, __file__, 1, msg, args, exc_info, extra=extra
    )
    record.created = 1796397601.123456  # 2026-12-04T17:20:01.123 UTC, fixed
    return record


@pytest.fixture
def captured() -> Iterator[Callable[[str, str], io.StringIO]]:
    """setup_logging into a buffer; the package logger is restored afterwards (other
    tests read its records through caplog, which needs propagation)."""
    root = logging.getLogger("p2pfl")
    saved = (root.handlers[:], root.level, root.propagate)

    def start(log_format: str, level: str = "debug") -> io.StringIO:
        buffer = io.StringIO()
        setup_logging(level, log_format, stream=buffer)
        return buffer

    yield start
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert all(key in line for key in STABLE_KEYS), line
    return lines


# ---- the two formats -------------------------------------------------------------------


def test_text_lines_start_with_an_iso8601_time_to_the_millisecond() -> None:
    record = _record()
    line = TextFormatter().format(record)
    stamp, level, logger, message = line.split(None, 3)
    assert ISO_MS.match(stamp), stamp
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() is not None  # the offset makes lines of two hosts comparable
    assert abs(parsed.timestamp() - record.created) < 0.001
    assert parsed.microsecond // 1000 == 123
    assert (level, logger, message) == ("INFO", "p2pfl.node:", "hello world")


def test_a_json_line_has_the_stable_keys_the_event_and_its_fields() -> None:
    extra = event("peer.connected", peer="ab" * 16, direction="inbound", found_via="mdns")
    line = json.loads(JsonFormatter().format(_record("peer %s connected", ("abab",), extra=extra)))
    assert line == {
        "ts": line["ts"],
        "level": "info",
        "logger": "p2pfl.node",
        "event": "peer.connected",
        "msg": "peer abab connected",
        "peer": "ab" * 16,
        "direction": "inbound",
        "found_via": "mdns",
    }
    assert ISO_MS.match(line["ts"])
    assert datetime.fromisoformat(line["ts"]) == datetime.fromisoformat(
        TextFormatter().format(_record()).split(" ", 1)[0]
    )


def test_a_record_without_an_event_gets_a_name_derived_from_its_logger() -> None:
    fmt = JsonFormatter()
    assert json.loads(fmt.format(_record(name="p2pfl.transport")))["event"] == ("transport.message")
    assert json.loads(fmt.format(_record(name="p2pfl")))["event"] == "p2pfl.message"


def test_json_stays_one_line_per_record_whatever_the_record_holds() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        exc_info = sys.exc_info()
    extra = event("x.y", msg="clash", level=3, ratio=float("nan"), path=Path("/a"), ids=("a",))
    text = JsonFormatter().format(
        _record("two\nlines", (), level=logging.ERROR, extra=extra, exc_info=exc_info)
    )
    assert "\n" not in text
    line = json.loads(text)
    assert (line["msg"], line["level"], line["event"]) == ("two\nlines", "error", "x.y")
    # A field named like a stable key does not overwrite it.
    assert (line["field_msg"], line["field_level"]) == ("clash", 3)
    assert (line["ratio"], line["path"], line["ids"]) == ("nan", "/a", ["a"])
    assert "ValueError: bad\nthing" in line["exc"]


def test_setup_logging_writes_json_lines_at_the_chosen_level(
    captured: Callable[[str, str], io.StringIO],
) -> None:
    buffer = captured("json", "info")
    log = logging.getLogger("p2pfl.node")
    log.debug("not shown")
    log.info("round %d", 3, extra=event("round.finished", round=3))
    log.warning("plain")
    lines = _json_lines(buffer.getvalue())
    assert [(x["level"], x["event"]) for x in lines] == [
        ("info", "round.finished"),
        ("warning", "node.message"),
    ]
    assert lines[0]["round"] == 3


# ---- secrets -------------------------------------------------------------------------


def test_secret_fields_and_registered_secret_values_are_masked_in_both_formats() -> None:
    secret = b"federation-secret-4f2a9c"
    logs.redact(secret)
    try:
        raise OSError(f"cannot use {secret.decode()}")
    except OSError:
        exc_info = sys.exc_info()
    extra = event("x.y", secret_file="/etc/s", token="t0k3n", nested={"password": "pw"})
    record = _record("oops %r %s", (secret, secret.hex()), extra=extra, exc_info=exc_info)
    text = TextFormatter().format(record)
    line = JsonFormatter().format(record)
    for out in (text, line):
        assert secret.decode() not in out and secret.hex() not in out, out
        assert logs.REDACTED in out
    parsed = json.loads(line)
    assert parsed["token"] == parsed["secret_file"] == logs.REDACTED
    assert parsed["nested"] == {"password": logs.REDACTED}
    assert "t0k3n" not in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_node_start_up_never_logs_its_federation_secret(tmp_path: Path, log_format: str) -> None:
    """A real `p2pfl node` at debug level, with a secret file and a bootstrap peer that
    is not there (so dialing is logged too); stopped with SIGTERM once it listens."""
    secret = "s3cret-of-the-federation-7f1e"
    (tmp_path / "secret").write_text(secret + "\n")
    err = tmp_path / "stderr"
    argv = [sys.executable, "-m", "p2pfl", "node", "--no-mdns", "--dataset", "synthetic"]
    argv += ["--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0"]
    argv += ["--peer", "127.0.0.1:9", "--secret-file", str(tmp_path / "secret")]
    argv += ["--log-level", "debug", "--log-format", log_format, "--rounds", "0"]
    with err.open("w") as sink:
        proc = subprocess.Popen(argv, stderr=sink, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "dial 127.0.0.1:9 failed" not in err.read_text():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    out = err.read_text()
    assert proc.returncode == 0, out
    assert secret not in out and secret.encode().hex() not in out
    if log_format == "json":
        events = {x["event"] for x in _json_lines(out)}
        assert {"node.started", "dial.failed", "node.stopping"} <= events, events
    else:
        assert all(ISO_MS.match(line.split(" ", 1)[0]) for line in out.splitlines()), out


# ---- event names from the code that emits them ----------------------------------------


async def test_a_small_federation_logs_its_key_events_with_their_fields(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    captured: Callable[[str, str], io.StringIO],
) -> None:
    buffer = captured("json", "debug")
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=2)
    await run_until_done(nodes)
    peer = nodes[1].id
    nodes[0].mesh.count_rejection(peer, "stale", "round 1")
    lines = _json_lines(buffer.getvalue())
    by_event: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_event.setdefault(line["event"], []).append(line)
    for name in ("node.started", "peer.connected", "round.started", "round.finished"):
        assert name in by_event, sorted(by_event)
    assert {"checkpoint.written", "run.finished"} <= set(by_event), sorted(by_event)
    assert len(by_event["run.finished"]) == 3 and by_event["run.finished"][0]["rounds"] == 2
    assert {x["direction"] for x in by_event["peer.connected"]} == {"inbound", "outbound"}
    finished = by_event["round.finished"]
    assert sorted(x["round"] for x in finished) == [0, 0, 0, 1, 1, 1]  # rounds count from 0
    row = finished[-1]
    assert isinstance(row["bytes_sent"], int) and row["bytes_sent"] > 0  # numbers, not text
    assert set(row["metrics"]) >= {"accuracy", "loss"}
    assert row["peers_heard"] == 2 and row["timed_out"] is False
    # The text of the same line uses the one unit convention.
    assert f"sent {format_bytes(row['bytes_sent'])} " in row["msg"]
    (rejected,) = by_event["message.rejected"]
    assert (rejected["peer"], rejected["reason"], rejected["level"]) == (peer, "stale", "debug")
    assert all(datetime.fromisoformat(x["ts"]).utcoffset() is not None for x in lines)


async def test_a_wrong_federation_is_logged_as_a_failed_handshake_with_its_reason(
    captured: Callable[[str, str], io.StringIO],
) -> None:
    buffer = captured("json", "info")
    server = TcpTransport(Identity.from_seed(b"\xaa" * 32), federation="alpha")
    intruder = TcpTransport(Identity.from_seed(b"\xcc" * 32), federation="beta")

    async def handler(conn: Any) -> None:
        await conn.aclose()

    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, handler)
        with pytest.raises(HandshakeError):
            await intruder.connect(address)
        with trio.fail_after(10):  # the server logs once its side of TLS gives up
            while '"handshake.failed"' not in buffer.getvalue():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    (failed,) = [x for x in _json_lines(buffer.getvalue()) if x["event"] == "handshake.failed"]
    # The dialer checks the certificate first and sends its TLS alert (unknown CA), so
    # the dialed side can say why too (tests/test_handshake_refusals.py).
    assert failed["direction"] == "inbound" and failed["level"] == "warning"
    assert failed["address"].startswith("127.0.0.1:") and "federation" in failed["reason"]


async def test_a_dial_that_proves_another_id_is_an_outbound_failed_handshake(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    captured: Callable[[str, str], io.StringIO],
) -> None:
    """A dial target whose id is known wrongly (a stale peer-exchange entry, a spoofed
    mDNS record): the dialing side logs the reason."""
    buffer = captured("json", "info")
    network = MemoryNetwork()
    (node,) = make_nodes(tmp_path, 1, network, total=1, rounds=1, min_peers=1)
    other = Identity.from_seed(b"\x07" * 32)

    async def hang_up(conn: Any) -> None:
        await conn.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await nursery.start(MemoryTransport(network, other, "mem:x").listen, hang_up)
        node.peers.add_address("mem:x", peer_id="f" * 32, found_via="peer-exchange")
        node.mesh.notify_peers_changed()
        with trio.fail_after(60):  # mock time
            while '"handshake.failed"' not in buffer.getvalue():
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    failed = next(x for x in _json_lines(buffer.getvalue()) if x["event"] == "handshake.failed")
    assert (failed["direction"], failed["address"]) == ("outbound", "mem:x")
    assert f"proved id {other.peer_id}, expected {'f' * 32}" in failed["reason"]


def test_an_aggregation_fallback_is_an_event_with_its_rule_and_reason() -> None:
    import numpy as np

    from p2pfl.aggregation import make_rule

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    agg = logging.getLogger("p2pfl.aggregation")
    agg.addHandler(handler)
    try:
        x = np.zeros((3, 4), dtype=np.float32)
        make_rule("krum", f=2)(x, np.ones(3), x[0])
    finally:
        agg.removeHandler(handler)
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["event"] == "aggregation.fallback"
    assert (line["rule"], line["reason"]) == ("krum", "too_few_inputs")


# ---- configuration ---------------------------------------------------------------------


def test_log_format_is_a_flag_and_a_config_file_key(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text('log_format = "json"\n')
    values = load_config_file(tmp_path / "node.toml")
    assert build_config(values, {}).log_format == "json"
    flags = coerce({"log_format": "text"}, source="command line")
    assert build_config(values, flags).log_format == "text"  # the flag wins
    assert build_config({}, {}).log_format == "text"
    with pytest.raises(ConfigError, match=r"log_format.*must be one of text, json"):
        build_config({"log_format": "xml"}, {})


def test_a_bad_log_format_flag_is_one_line_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["node", "--log-format", "yaml"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "log_format" in line and "text, json" in line


# ---- units -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),  # never "1024.0 KiB"
        (3 * 2**20 + 2**19, "3.5 MiB"),
        (5 * 2**30, "5.0 GiB"),
        (2**40, "1.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes_uses_binary_units(size: int, shown: str) -> None:
    assert format_bytes(size) == shown


def test_status_and_scenario_tables_share_the_byte_format() -> None:
    from p2pfl.control.render import fmt_bytes
    from p2pfl.scenario import report

    assert fmt_bytes(1536) == format_bytes(1536) == "1.5 KiB"
    assert report.format_bytes is format_bytes


def test_in_process_nodes_say_which_node_a_line_comes_from(tmp_path: Path) -> None:
    """Every node of an in-process scenario writes to one nodes.log: each line names its
    node, including lines from worker threads and from tasks the node started."""
    from p2pfl.scenario import parse_scenario
    from p2pfl.scenario.inprocess import run_in_process

    s = parse_scenario({"name": "named", "nodes": 3, "rounds": 2, "model": {"name": "softmax"}})
    run_in_process(s, tmp_path)
    lines = (tmp_path / "nodes.log").read_text().splitlines()
    started = [line for line in lines if "listening on mem:" in line]
    assert sorted(line.split("p2pfl.node [")[1][:2] for line in started) == ["n0", "n1", "n2"]
    finished = [line for line in lines if "finished 2 rounds" in line]
    assert len(finished) == 3 and all("p2pfl.node [n" in line for line in finished)


def test_json_lines_carry_the_node_name_when_one_is_set() -> None:
    from p2pfl.logs import NODE_NAME

    record = logging.LogRecord("p2pfl.node", logging.INFO, __file__, 1, "hello", None, None)
    assert "node" not in json.loads(JsonFormatter().format(record))
    token = NODE_NAME.set("n7")
    try:
        assert json.loads(JsonFormatter().format(record))["node"] == "n7"
        assert "p2pfl.node [n7]: hello" in TextFormatter().format(record)
    finally:
        NODE_NAME.reset(token)
