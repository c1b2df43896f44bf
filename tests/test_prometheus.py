"""The Prometheus endpoint: a status snapshot becomes well-formed exposition text (checked
with prometheus-client's own parser), a live node answers a scrape over loopback, and a
bad request or a bad config is refused clearly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.transport.memory import MemoryNetwork

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from p2pfl.node.prometheus import Exporter, metrics_address, response_for, serve_metrics


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


async def test_a_finished_federations_status_becomes_metrics(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=3)
    await run_until_done(nodes)
    status = nodes[0].status()
    body, ctype = Exporter(lambda: status).render()
    assert ctype.startswith("text/plain")
    fam = families(body.decode())
    assert fam["p2pfl_round"].samples[0].value == status["round"]["current"]
    info = fam["p2pfl_node_info"].samples[0]
    assert info.labels["peer_id"] == nodes[0].id and info.value == 1
    by_state = {s.labels["state"]: s.value for s in fam["p2pfl_peers"].samples}
    assert by_state == dict(Counter(p["state"] for p in status["peers"]))
    assert sum(by_state.values()) == 2
    sent = samples(fam["p2pfl_bytes"])[(("direction", "sent"),)]
    assert sent == status["counters"]["bytes_sent"] > 0
    hist = fam["p2pfl_round_duration_seconds"]
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert count == len(status["history"]) == 3  # every round observed, once
    accuracy = fam["p2pfl_model_accuracy"].samples[0].value
    assert accuracy == status["history"][-1]["accuracy"]
    assert {s.labels["metric"] for s in fam["p2pfl_model_metric"].samples} >= {"loss", "accuracy"}
    assert "p2pfl_aggregation_fallbacks" in fam and "p2pfl_peer_suspicion" in fam
    # A second scrape does not count the same rounds again.
    again = families(Exporter(lambda: status).render()[0].decode())  # a fresh exporter...
    assert next(s.value for s in again["p2pfl_round_duration_seconds"].samples
                if s.name.endswith("_count")) == 3  # fmt: skip
    exporter = Exporter(lambda: status)
    exporter.render()
    hist2 = families(exporter.render()[0].decode())["p2pfl_round_duration_seconds"]
    assert next(s.value for s in hist2.samples if s.name.endswith("_count")) == 3


def test_privacy_and_secure_sections_when_present() -> None:
    status = {
        "node": {"id": "x"},
        "round": {"current": 2, "phase": "collecting"},
        "privacy": {"epsilon": 1.5, "budget": 4.0, "exhausted": False},
        "secure": {"rounds_grouped": 5, "rounds_out": {"too_few": 2}, "means_forwarded": 7},
    }
    fam = families(Exporter(lambda: status).render()[0].decode())
    assert fam["p2pfl_privacy_epsilon_spent"].samples[0].value == 1.5
    assert fam["p2pfl_privacy_epsilon_budget"].samples[0].value == 4.0
    assert fam["p2pfl_secure_rounds_grouped"].samples[0].value == 5
    assert samples(fam["p2pfl_secure_rounds_without_group"]) == {(("reason", "too_few"),): 2.0}
    assert samples(fam["p2pfl_phase"]) == {(("phase", "collecting"),): 1.0}


def test_http_answers_get_metrics_and_refuses_the_rest() -> None:
    exporter = Exporter(lambda: {"round": {"current": 4}})
    ok = response_for(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", exporter)
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"p2pfl_round 4.0" in body
    assert response_for(b"GET /other HTTP/1.1\r\n\r\n", exporter).startswith(b"HTTP/1.0 404")
    assert response_for(b"POST /metrics HTTP/1.1\r\n\r\n", exporter).startswith(b"HTTP/1.0 405")
    assert response_for(b"\x00garbage", exporter).startswith(b"HTTP/1.0 400")


async def test_a_live_endpoint_on_loopback_answers_a_scrape() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, "127.0.0.1:0", lambda: {"round": {"current": 7}})
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.0 200")
        assert (
            families(data.partition(b"\r\n\r\n")[2].decode())["p2pfl_round"].samples[0].value == 7
        )
        # An oversized request is refused and the server keeps serving.
        big = await trio.open_tcp_stream("127.0.0.1", port)
        await big.send_all(b"GET /" + b"a" * 10_000)
        reply = b""
        while chunk := await big.receive_some(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.0 400")
        again = await trio.open_tcp_stream("127.0.0.1", port)
        await again.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert (await again.receive_some(65536)).startswith(b"HTTP/1.0 200")
        nursery.cancel_scope.cancel()


def test_addresses_and_config() -> None:
    assert metrics_address("9464") == ("127.0.0.1", 9464)  # a bare port is loopback
    assert metrics_address("[::1]:9464") == ("::1", 9464)
    assert NodeConfig(metrics_listen="127.0.0.1:9464").validated().metrics_listen
    with pytest.raises(ConfigError) as info:
        NodeConfig(metrics_listen="nope").validated()
    assert info.value.field == "metrics_listen" and "\n" not in str(info.value)


def test_the_grafana_dashboard_asks_only_for_metrics_the_exporter_has() -> None:
    import json
    import re

    dashboard = Path(__file__).resolve().parent.parent / "examples/grafana/p2pfl-federation.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    wanted = {
        re.sub(r"_(total|bucket)$", "", m) for e in exprs for m in re.findall(r"p2pfl_\w+", e)
    }
    status = {
        "node": {"id": "x"},
        "round": {"current": 1, "phase": "collecting"},
        "peers": [{"id": "p", "state": "connected", "bytes_in": 1, "bytes_out": 2}],
        "counters": {"bytes_sent": 1, "bytes_received": 2, "frames_rejected": {"bad": 1},
                     "contained_errors": {"train": 1}},
        "robustness": {"fallbacks": {"too_few_inputs": 1}, "guards": {"bucketing": 1},
                       "suspicion": {"p": {"score": 0.5}}},
        "history": [{"round": 0, "seconds": 1.0, "accuracy": 0.5, "loss": 1.0}],
        "privacy": {"epsilon": 1.0, "budget": 4.0},
        "secure": {"rounds_grouped": 1, "rounds_out": {"too_few": 1}},
    }  # fmt: skip
    have = set(families(Exporter(lambda: status).render()[0].decode()))
    assert wanted <= have, wanted - have
