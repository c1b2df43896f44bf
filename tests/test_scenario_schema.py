"""Scenario schema, topology generators and the report (no nodes needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.config import NodeConfig
from p2pfl.learning import partition_indices
from p2pfl.scenario import ScenarioError, load_scenario, parse_scenario
from p2pfl.scenario import topology as topo
from p2pfl.scenario.report import build_metrics, plot_accuracy, write_report

ROOT = Path(__file__).resolve().parent.parent


# ---- schema ---------------------------------------------------------------------------


def _err(doc: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(doc)
    return str(info.value)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({}, "nodes: is required"),
        ({"nodes": "8"}, "nodes: expected an integer"),
        ({"nodes": 1}, "nodes: must be >= 2"),
        ({"nodes": 8, "rounds": 0}, "rounds: must be >= 1"),
        ({"nodes": 8, "topology": {"kind": "kregular", "degree": 8}}, "topology.degree: must be <"),
        ({"nodes": 8, "topology": {"kind": "kregular"}}, "topology.degree: is required"),
        ({"nodes": 7, "topology": {"kind": "kregular", "degree": 3}}, "topology.degree: nodes *"),
        ({"nodes": 8, "topology": {"kind": "ring", "degree": 2}}, "topology.degree: only used"),
        ({"nodes": 8, "topology": {"kind": "star"}}, "topology.kind: unknown value 'star'"),
        ({"nodes": 4, "topology": {"kind": "edges", "edges": [[0, 1], [2, 3]]}}, "not connected"),
        ({"nodes": 4, "topology": {"kind": "edges", "edges": [[0, 1], [1, 4]]}}, "edges[1]"),
        ({"nodes": 4, "topology": {"kind": "edges", "edges": [[0, 0]]}}, "self loop"),
        ({"nodes": 4, "topology": {"kind": "edges", "edges": [[0, "1"]]}}, "topology.edges[0]"),
        ({"nodes": 4, "data": {"partition": "shards"}}, "data.partition: unknown value"),
        ({"nodes": 4, "data": {"alpha": 0}}, "data.alpha: must be > 0"),
        ({"nodes": 4, "topology": {"kind": "cliques"}}, "topology.cliques: is required"),
        ({"nodes": 4, "topology": {"kind": "ring", "cliques": 2}}, "topology.cliques: only"),
        ({"nodes": 4, "topology": {"kind": "cliques", "cliques": 5}}, "topology.cliques: must"),
        ({"nodes": 4, "data": {"clusters": 0}}, "data.clusters: must be >= 1"),
        ({"nodes": 4, "data": {"partition": "clusters", "clusters": 5}}, "data.clusters: must"),
        ({"nodes": 4, "model": {"name": "cnn"}}, "model.name: unknown value 'cnn'"),
        ({"nodes": 4, "training": {"lr": "fast"}}, "training.lr: expected a number"),
        ({"nodes": 4, "training": {"epochs": True}}, "training.epochs: expected an integer"),
        ({"nodes": 4, "protocol": {"neighbours": 4}}, "protocol.neighbours: must be in 1..3"),
        ({"nodes": 4, "protocol": {"neighbours": "some"}}, "protocol.neighbours: expected"),
        ({"nodes": 4, "protocol": {"quorum": 1.5}}, "protocol.quorum"),
        ({"nodes": 4, "protocol": {"heartbeat_timeout": 0.5}}, "protocol.heartbeat_timeout"),
        ({"nodes": 4, "name": "a b"}, "name: must be"),
        ({"nodes": 4, "topology": "ring"}, "topology: expected a table"),
        ({"nodes": 4, "attack": {"kind": "sign_flip"}}, "attack: give exactly one of nodes"),
        ({"nodes": 4, "faults": [{"kind": "crash"}]}, "faults[0].at_round: is required"),
    ],
)
def test_schema_errors_name_the_field(doc: dict[str, Any], expected: str) -> None:
    assert expected in _err(doc)


def test_unknown_keys_are_rejected_with_the_known_ones() -> None:
    msg = _err({"nodes": 4, "training": {"epochs": 1, "learning_rate": 0.1}})
    assert msg.startswith("training.learning_rate: unknown key")
    assert "epochs, lr, batch_size" in msg
    msg = _err({"nodes": 4, "topolgy": {"kind": "ring"}})
    assert msg.startswith("topolgy: unknown key") and "topology" in msg


def test_reserved_tables_are_accepted_when_empty() -> None:
    s = parse_scenario({"nodes": 3, "aggregation": {}, "compression": {}, "faults": []})
    assert s.nodes == 3


def test_defaults_and_name_from_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text("nodes = 3\n")
    s = load_scenario(path)
    assert (s.name, s.rounds, s.topology.kind, s.model.name) == ("tiny", 10, "full", "softmax")


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("nodes = = 3\n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["quickstart.toml", "ring.toml"])
def test_shipped_scenarios_load(name: str) -> None:
    s = load_scenario(ROOT / "scenarios" / name)
    assert s.nodes == 8


def test_node_config_values_follow_the_topology() -> None:
    s = parse_scenario({"nodes": 6, "rounds": 3, "seed": 5, "topology": {"kind": "ring"}})
    addrs = [f"127.0.0.1:{9000 + i}" for i in range(6)]
    values = s.node_config_values(addrs, [Path(f"/tmp/n{i}") for i in range(6)])
    configs = [NodeConfig(**v).validated() for v in values]
    assert configs[0].peers == ("127.0.0.1:9001", "127.0.0.1:9005")
    assert all(not c.peer_exchange and c.min_peers == 2 for c in configs)
    assert [c.node_index for c in configs] == list(range(6))
    assert len({c.seed for c in configs}) == 6  # per-node seeds differ
    assert {c.data_seed for c in configs} == {5} and {c.model_seed for c in configs} == {5}
    full = parse_scenario({"nodes": 4}).node_config_values(addrs[:4], [Path(".")] * 4)
    assert full[2]["peers"] == tuple(a for i, a in enumerate(addrs[:4]) if i != 2)
    assert full[2]["peer_exchange"] is True


# ---- topology -------------------------------------------------------------------------


def _degrees(n: int, edge_list: list[tuple[int, int]]) -> list[int]:
    return [len(a) for a in topo.adjacency(n, edge_list)]


def test_full_and_ring() -> None:
    assert len(topo.edges("full", 6)) == 15
    ring = topo.edges("ring", 7)
    assert _degrees(7, ring) == [2] * 7 and topo.is_connected(7, ring)
    assert topo.neighbours_of(ring, 0) == [1, 6]
    assert topo.edges("ring", 2) == [(0, 1)]


@pytest.mark.parametrize(("n", "k"), [(8, 3), (10, 4), (50, 4), (100, 6), (9, 8)])
def test_kregular_is_regular_simple_connected_and_seeded(n: int, k: int) -> None:
    e = topo.edges("kregular", n, degree=k, seed=1)
    assert _degrees(n, e) == [k] * n
    assert len(set(e)) == len(e) and all(i < j for i, j in e)
    assert topo.is_connected(n, e)
    assert e == topo.edges("kregular", n, degree=k, seed=1)


def test_kregular_seeds_differ() -> None:
    assert topo.edges("kregular", 20, degree=3, seed=1) != topo.edges(
        "kregular", 20, degree=3, seed=2
    )


def test_cliques_are_the_clusters_blocks_joined_in_a_chain() -> None:
    dumbbell = topo.edges("cliques", 20, cliques=2)
    assert len(dumbbell) == 2 * 45 + 1 and (9, 10) in dumbbell  # the one bridge
    assert _degrees(20, dumbbell) == [9] * 9 + [10, 10] + [9] * 9
    three = topo.edges("cliques", 7, cliques=3)  # blocks 0-2, 3-4, 5-6
    assert three == [(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    # A node's community is its label cluster: both cut nodes the same way.
    y = np.arange(700) % 10
    parts = partition_indices(y, 7, scheme="clusters", clusters=3)
    labels = [frozenset(y[p].tolist()) for p in parts]
    for block in topo.blocks(7, 3):
        assert len({labels[i] for i in block}) == 1
    assert topo.edges("cliques", 3, cliques=3) == [(0, 1), (1, 2)]  # singletons: a path
    with pytest.raises(topo.TopologyError, match="required"):
        topo.edges("cliques", 4)
    with pytest.raises(topo.TopologyError, match=r"must be in 1\.\.4"):
        topo.edges("cliques", 4, cliques=5)


def test_explicit_edges_validated() -> None:
    assert topo.edges("edges", 3, edges=[[1, 0], [1, 2], [0, 1]]) == [(0, 1), (1, 2)]
    with pytest.raises(topo.TopologyError, match="not connected"):
        topo.edges("edges", 4, edges=[[0, 1], [2, 3]])
    with pytest.raises(topo.TopologyError, match="out of range"):
        topo.edges("edges", 3, edges=[[0, 3]])
    with pytest.raises(topo.TopologyError, match="self loop"):
        topo.edges("edges", 3, edges=[[1, 1]])


# ---- report ---------------------------------------------------------------------------


def _synthetic_nodes(n: int, rounds: int) -> dict[str, dict[str, Any]]:
    return {
        f"n{i}": {
            "peer_id": f"peer{i}",
            "rounds": [
                {
                    "round": r,
                    "accuracy": 0.5 + 0.04 * r + 0.01 * i,
                    "loss": 1.0 / r,
                    "bytes_sent": 1000 * r,
                    "bytes_received": 900 * r,
                    "seconds": 0.1,
                    "peers_heard": n - 1,
                }
                for r in range(1, rounds + 1)
            ],
        }
        for i in range(n)
    }


def test_report_writes_metrics_and_plot(tmp_path: Path) -> None:
    s = parse_scenario({"name": "synthetic", "nodes": 3, "rounds": 4})
    metrics = write_report(
        tmp_path, s, _synthetic_nodes(3, 4), wall_seconds=2.5, mode="test", console=None
    )
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc == json.loads(json.dumps(metrics))
    assert set(doc) == {"scenario", "mode", "complete", "nodes", "summary", "wall_seconds"}
    assert doc["scenario"]["name"] == "synthetic" and doc["wall_seconds"] == 2.5
    assert list(doc["nodes"]) == ["n0", "n1", "n2"] and doc["nodes"]["n1"]["peer_id"] == "peer1"
    final = doc["summary"]["final"]
    assert final["accuracy_mean"] == pytest.approx(0.5 + 0.16 + 0.01)
    assert (final["accuracy_min"], final["accuracy_max"]) == pytest.approx((0.66, 0.68))
    assert final["bytes_sent_total"] == 3 * 4000 and final["bytes_received_total"] == 3 * 3600
    assert [r["round"] for r in doc["summary"]["per_round"]] == [1, 2, 3, 4]
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_summary_tolerates_uneven_and_missing_rows(tmp_path: Path) -> None:
    s = parse_scenario({"nodes": 2, "rounds": 3})
    nodes = _synthetic_nodes(2, 3)
    nodes["n1"]["rounds"] = nodes["n1"]["rounds"][:1]  # one node fell behind
    nodes["n0"]["rounds"][2]["accuracy"] = None
    m = build_metrics(s, nodes, wall_seconds=1.0, mode="test")
    per_round = m["summary"]["per_round"]
    assert [r["nodes"] for r in per_round] == [2, 1, 1]
    assert per_round[2]["accuracy_mean"] is None
    assert m["summary"]["final"]["rounds_completed_min"] == 1
    assert plot_accuracy(m, tmp_path / "a.png") == tmp_path / "a.png"
