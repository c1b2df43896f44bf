"""The asynchronous mode wired into the node and the scenarios (issue 20)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.protocol import GossipMachine, RoundMachine
from p2pfl.scenario import parse_scenario
from p2pfl.scenario.inprocess import run_in_process
from p2pfl.scenario.report import build_metrics
from p2pfl.scenario.schema import ScenarioError
from p2pfl.storage import load_checkpoint
from p2pfl.transport.memory import MemoryNetwork


async def test_async_nodes_mix_each_others_models_and_all_finish(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rounds = 12
    nodes = make_nodes(tmp_path, 4, MemoryNetwork(), rounds=rounds, mode="async", epochs=2)
    assert all(isinstance(n.machine, GossipMachine) for n in nodes)
    await run_until_done(nodes)
    for node in nodes:
        assert node.machine.round >= rounds
        steps = [row["round"] for row in node.history]
        assert steps == sorted(set(steps))  # versions only go up
        assert not any(row["timed_out"] for row in node.history)  # nothing waited for
        ckpt = load_checkpoint(node.data_dir / "checkpoint.msgpack")
        assert ckpt is not None and ckpt.round == node.machine.round
    # They did learn together: most steps mixed a neighbour's model, and they agree.
    heard = [row["peers_heard"] for node in nodes for row in node.history]
    assert sum(h > 0 for h in heard) >= 0.75 * len(heard)
    assert min(node.history[-1]["accuracy"] for node in nodes) > 0.85
    params = np.stack([node.machine.params for node in nodes])
    assert np.abs(params - params.mean(axis=0)).max() < 0.5


def test_the_synchronous_rounds_stay_the_default() -> None:
    assert NodeConfig().mode == "sync"
    doc = parse_scenario({"nodes": 3, "rounds": 2})
    values = doc.node_config_values(["mem:a", "mem:b", "mem:c"], [Path(d) for d in "abc"])
    assert [v["mode"] for v in values] == ["sync"] * 3


def scenario(**protocol: Any) -> dict[str, Any]:
    return {
        "name": "asyncmesh",
        "nodes": 6,
        "rounds": 15,
        "seed": 0,
        "topology": {"kind": "kregular", "degree": 3},
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"name": "mlp", "hidden": 32},
        "training": {"epochs": 2, "lr": 0.05, "batch_size": 32},
        "protocol": {"round_timeout": 30.0, **protocol},
    }


def final_accuracy(doc: dict[str, Any], out: Path) -> float:
    s = parse_scenario(doc)
    records, wall = run_in_process(s, out)
    metrics = build_metrics(s, records, wall_seconds=wall, mode="in-process")
    return float(metrics["summary"]["final"]["accuracy_mean"])


def test_an_async_scenario_learns_like_the_synchronous_one(tmp_path: Path) -> None:
    sync = final_accuracy(scenario(), tmp_path / "sync")
    asynchronous = final_accuracy(scenario(mode="async"), tmp_path / "async")
    assert asynchronous > 0.85 and abs(asynchronous - sync) < 0.05


def test_async_with_compression_keeps_per_peer_streams(tmp_path: Path) -> None:
    doc = scenario(mode="async")
    doc["compression"] = {"pipeline": ["delta", "topk:0.1", "quantize:8"]}
    assert final_accuracy(doc, tmp_path / "out") > 0.8


@pytest.mark.parametrize(
    ("fields", "key", "message"),
    [
        ({"mode": "fast"}, "mode", "must be one of sync, async"),
        ({"mode": "async", "secure_aggregation": True}, "mode", "secure aggregation"),
        (
            {"mode": "async", "compression": ("topk:0.1",), "compression_consensus": 0.5},
            "mode",
            "compression_consensus",
        ),
        ({"staleness_exponent": -1.0}, "staleness_exponent", ">= 0"),
        ({"staleness_exponent": float("nan")}, "staleness_exponent", ">= 0"),
        ({"max_staleness": -1}, "max_staleness", ">= 0"),
    ],
)
def test_bad_async_settings_are_one_line_config_errors(
    fields: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(**fields).validated()
    assert info.value.field == key and message in str(info.value)


@pytest.mark.parametrize(
    ("protocol", "where"),
    [
        ({"mode": "asynchronous"}, "protocol.mode"),
        ({"staleness_exponent": -0.5}, "protocol.staleness_exponent"),
        ({"max_staleness": -2}, "protocol.max_staleness"),
    ],
)
def test_bad_async_scenario_keys_name_their_place(protocol: dict[str, Any], where: str) -> None:
    with pytest.raises(ScenarioError, match=re.escape(where)):
        parse_scenario(scenario(**protocol))


def test_a_secure_async_scenario_is_refused_up_front(tmp_path: Path) -> None:
    doc = scenario(mode="async")
    doc["secure_aggregation"] = {"enabled": True}
    with pytest.raises((ScenarioError, ConfigError), match="secure aggregation"):
        s = parse_scenario(doc)
        run_in_process(s, tmp_path)


def test_the_round_machine_is_untouched_in_sync_mode(tmp_path: Path) -> None:
    (node,) = make_nodes(tmp_path, 1, MemoryNetwork(), min_peers=0)
    assert isinstance(node.machine, RoundMachine)


def test_async_real_nodes_survive_a_crash_and_restart(tmp_path: Path) -> None:
    """Real processes and TLS: a node SIGKILLed mid-run comes back on its data dir and
    jumps to its neighbours' versions by mixing (their final models, once they are done)."""
    from p2pfl.scenario.processes import run_processes

    s = parse_scenario(
        {
            "nodes": 3,
            "rounds": 10,
            "protocol": {"mode": "async", "round_timeout": 10.0},
            "training": {"epochs": 2},
            "faults": [
                {"at_round": 0, "kind": "delay", "delay": 0.2},  # steps take real time
                {"at_round": 2, "kind": "crash", "nodes": [2]},
                {"at_round": 4, "kind": "restart", "nodes": [2]},
            ],
        }
    )
    records, _ = run_processes(s, tmp_path, timeout=120)
    assert [e["kind"] for e in records["n2"]["events"]] == ["crash", "restart"]
    # The new process runs on the same data dir (from its checkpoint, when the killed
    # one had written one yet: steps here are faster than the disk) and finishes.
    log = (tmp_path / "nodes" / "n2" / "node.log").read_text()
    second_run = re.split(r"node \w+ listening on", log)[2:]
    assert len(second_run) == 1 and "finished" in second_run[0], log[-2000:]
    for i in range(3):
        ckpt = load_checkpoint(tmp_path / "nodes" / f"n{i}" / "checkpoint.msgpack")
        assert ckpt is not None and ckpt.round >= 10
        rows = records[f"n{i}"]["rounds"]
        assert rows[-1]["accuracy"] > 0.8


@pytest.mark.parametrize(
    ("extra", "floor"),
    [
        ({"training": {"epochs": 2, "outer": "fedadam", "prox_mu": 0.01}}, 0.85),
        ({"training": {"epochs": 2, "personalize": "ditto"}}, 0.85),
        # Noise 0.3 x clip 5 on every step: sync ends at about 0.70, async at 0.60.
        ({"privacy": {"noise": 0.3, "clip": 5.0}}, 0.3),
        (
            {
                "attack": {"kind": "sign_flip", "nodes": [2], "scale": 4.0},
                "aggregation": {"rule": "median", "f": 1},
            },
            0.85,
        ),
    ],
    ids=["outer-prox", "ditto", "dp", "attack-median"],
)
def test_what_works_per_round_works_per_step(
    tmp_path: Path, extra: dict[str, Any], floor: float
) -> None:
    """docs/protocol.md claims these work in the asynchronous mode: every node finishes
    with a model that learned (a sign-flipper is voted down; DP noise costs accuracy)."""
    doc = {**scenario(mode="async"), **extra}
    s = parse_scenario(doc)
    records, wall = run_in_process(s, tmp_path)
    metrics = build_metrics(s, records, wall_seconds=wall, mode="in-process")
    finals = [rec["rounds"][-1] for name, rec in metrics["nodes"].items() if name != "n2"]
    assert all(row["round"] >= 14 - 1 for row in finals)
    assert min(row["accuracy"] for row in finals) > floor
