"""The dialed side of a failed handshake learns why: the dialer sends the TLS alert
OpenSSL queued (trio alone drops it, leaving only EOF), the listener keeps each failing
host with its last reason, and status, the table and Prometheus show it."""

from __future__ import annotations

import io
from typing import Any

import pytest
import trio
from rich.console import Console

from p2pfl.control.render import render_status
from p2pfl.identity import Identity
from p2pfl.node.status import inbound_failures
from p2pfl.transport.base import HandshakeError
from p2pfl.transport.refusals import MAX_REASON, HandshakeFailures, host_of
from p2pfl.transport.tcp import TcpTransport

A = Identity.from_seed(b"\xa1" * 32)
C = Identity.from_seed(b"\xc3" * 32)


def test_host_of_drops_the_ephemeral_port() -> None:
    assert host_of("10.0.0.2:41234") == "10.0.0.2"
    assert host_of("[::1]:5") == "::1"
    assert host_of("?") == "?"
    assert host_of("mem:n3") == "mem:n3"  # not host:port: kept whole


def test_failures_are_kept_per_host_bounded_and_most_failing_first() -> None:
    record = HandshakeFailures(max_hosts=3)
    record.record("10.0.0.1:1000", "timed out", 1.0)
    record.record("10.0.0.1:1001", "x" * 1000, 2.0)  # same host, another port
    for i, host in enumerate(("10.0.0.2", "10.0.0.3", "10.0.0.4")):
        record.record(f"{host}:9", "EOF", 3.0 + i)
    # The least recently failing host (10.0.0.1 at t=2) was forgotten for 10.0.0.4.
    assert len(record) == 3
    assert [r["address"] for r in record.snapshot(10.0)] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    record.record("10.0.0.3:7", "TLSV1_ALERT_UNKNOWN_CA", 9.0)
    top = record.snapshot(10.0)[0]
    assert top == {
        "address": "10.0.0.3",
        "failures": 2,
        "last_error": "TLSV1_ALERT_UNKNOWN_CA",
        "last_s": 1.0,
    }
    record.record("10.0.0.9:1", "y" * 1000, 10.0)
    assert all(len(r["last_error"]) <= MAX_REASON for r in record.snapshot(10.0))


@pytest.mark.parametrize(("federation", "secret"), [("beta", None), ("alpha", b"s" * 16)])
async def test_the_dialed_side_knows_a_wrong_federation_or_secret(
    federation: str, secret: bytes | None
) -> None:
    server = TcpTransport(A, federation="alpha", host="127.0.0.1")

    async def handler(conn: Any) -> None:
        await conn.aclose()

    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.listen, handler)
        intruder = TcpTransport(C, federation=federation, secret=secret)
        for _ in range(2):
            with pytest.raises(HandshakeError, match="federation"):
                await intruder.connect(address)
        with trio.fail_after(10):  # the listener's side of TLS ends on its own time
            while sum(r["failures"] for r in server.handshake_failures.snapshot(0.0)) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    (row,) = inbound_failures(server, trio.current_time())
    assert row["address"] == "127.0.0.1" and row["failures"] == 2
    # Before, the listener saw only the dialer hang up (UNEXPECTED_EOF_WHILE_READING).
    assert "UNKNOWN_CA" in row["last_error"] and "federation" in row["last_error"]
    assert server.events["inbound_handshake_failures"] == 2


def test_status_shows_inbound_failures_and_looks_through_a_wrapper() -> None:
    record = HandshakeFailures()
    record.record("10.0.0.7:4000", "TLSV1_ALERT_UNKNOWN_CA (peer refused ...)", 5.0)

    class Tcp:
        handshake_failures = record

    class Faulty:  # what FaultyTransport looks like from status
        inner = Tcp()

    rows = inbound_failures(Faulty(), 8.0)
    assert rows == [
        {
            "address": "10.0.0.7",
            "failures": 1,
            "last_error": "TLSV1_ALERT_UNKNOWN_CA (peer refused ...)",
            "last_s": 3.0,
        }
    ]
    assert inbound_failures(object(), 8.0) == []  # in-memory transports have none
    out = io.StringIO()
    status = {"node": {"id": "x"}, "round": {"current": 1}, "inbound_failures": rows}
    Console(file=out, width=200, color_system=None).print(render_status(status))
    assert "inbound 10.0.0.7: 1 failed handshake, last 3.0s ago: TLSV1_ALERT_UNKNOWN_CA" in (
        out.getvalue()
    )


def test_prometheus_counts_handshake_failures_by_direction() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from p2pfl.node.prometheus import Exporter

    status = {
        "node": {"id": "x"},
        "round": {"current": 1, "phase": "collecting"},
        "counters": {"handshake_failures": 2, "inbound_handshake_failures": 5, "dial_failures": 3},
    }
    fams = {
        f.name: f
        for f in text_string_to_metric_families(Exporter(lambda: status).render()[0].decode())
    }
    by_dir = {s.labels["direction"]: s.value for s in fams["p2pfl_handshake_failures"].samples
              if s.name.endswith("_total")}  # fmt: skip
    assert by_dir == {"outbound": 2.0, "inbound": 5.0}
    assert fams["p2pfl_dial_failures"].samples[0].value == 3.0
