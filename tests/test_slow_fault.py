"""The `slow` scenario fault (issue 20): chosen nodes' local training takes `factor` times
as long, so stragglers can be studied; the node waits out the extra time on the trio
clock, serving its peers meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pfl.config import ConfigError, NodeConfig, coerce
from p2pfl.learning.softmax import SoftmaxRegression
from p2pfl.node import Node
from p2pfl.scenario.faults import fault_table, report_timeline
from p2pfl.scenario.inprocess import build_nodes
from p2pfl.scenario.schema import ScenarioError, parse_scenario

SLOW = {"kind": "slow", "factor": 5, "nodes": [1]}


def scenario(*faults: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"nodes": 3, "rounds": 4, "faults": list(faults), **top}


# ---- the scenario file and the node config ------------------------------------------------


def test_slow_nodes_get_train_slowdown_and_the_others_nothing() -> None:
    s = parse_scenario(scenario(SLOW))
    (ev,) = s.faults
    assert (ev.kind, ev.at_round, ev.nodes, ev.factor) == ("slow", 0, (1,), 5.0)
    values = s.node_config_values(
        [f"mem:n{i}" for i in range(3)], [Path(f"n{i}") for i in range(3)]
    )
    assert values[1]["train_slowdown"] == 5.0
    assert "train_slowdown" not in values[0] and "train_slowdown" not in values[2]
    assert "faults" not in values[1]  # no plan file: the transport is not involved
    assert NodeConfig(**values[1]).validated().train_slowdown == 5.0
    # at_round may be given, as for other kinds (0: slow for the whole run).
    assert parse_scenario(scenario({**SLOW, "at_round": 0})).faults == s.faults


def test_the_fault_shows_in_the_timeline_and_the_table() -> None:
    s = parse_scenario(scenario({"kind": "slow", "factor": 2.5, "nodes": [0, 2]}))
    (row,) = report_timeline(s.faults, {})
    assert row == {"round": 0, "kind": "slow", "label": "slow x2.5 (n0,n2)", "nodes": [0, 2]}
    table = fault_table([row])
    assert table.row_count == 1 and list(table.columns[1].cells) == ["slow x2.5 (n0,n2)"]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"kind": "slow", "factor": 5}, r"faults\[0\]\.nodes: is required for kind 'slow'"),
        ({"kind": "slow", "nodes": [1]}, r"faults\[0\]\.factor: is required for kind 'slow'"),
        ({**SLOW, "factor": 1}, r"faults\[0\]\.factor: must be a finite number > 1"),
        ({**SLOW, "factor": 0.5}, r"faults\[0\]\.factor: must be a finite number > 1"),
        ({**SLOW, "factor": float("inf")}, r"faults\[0\]\.factor: must be a finite number > 1"),
        ({**SLOW, "factor": float("nan")}, r"faults\[0\]\.factor: must be a finite number > 1"),
        ({**SLOW, "factor": "5"}, r"faults\[0\]\.factor: expected a number, got '5'"),
        ({**SLOW, "factor": True}, r"faults\[0\]\.factor: expected a number, got True"),
        ({**SLOW, "speed": 2}, r"faults\[0\]\.speed: unknown key for kind 'slow'; known: "),
        ({**SLOW, "until_round": 2}, r"faults\[0\]\.until_round: unknown key for kind 'slow'"),
        ({**SLOW, "nodes": [3]}, r"faults\[0\]\.nodes: 3 is not a node index in 0\.\.2"),
        ({**SLOW, "at_round": 2}, r"faults\[0\]\.at_round: must be 0 for kind 'slow'"),
        ({**SLOW, "at_round": "0"}, r"faults\[0\]\.at_round: expected an integer"),
        (
            {**SLOW, "factor": 2, "kind": "delay"},
            r"faults\[0\]\.factor: unknown key for kind 'delay'",
        ),
    ],
)
def test_errors_name_the_fault_and_key(fault: dict[str, Any], expected: str) -> None:
    with pytest.raises(ScenarioError, match=expected):
        parse_scenario(scenario(fault))


def test_a_node_is_slowed_once() -> None:
    with pytest.raises(
        ScenarioError, match=r"faults\[1\]\.nodes: node 1 is already slow \(faults\[0\]\)"
    ):
        parse_scenario(scenario(SLOW, {"kind": "slow", "factor": 2, "nodes": [2, 1]}))


def test_other_kinds_still_need_at_round() -> None:
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.at_round: is required"):
        parse_scenario(scenario({"kind": "stall", "nodes": [1]}))


@pytest.mark.parametrize("value", [0.5, 0.0, -2.0, float("inf"), float("nan")])
def test_config_field_is_validated(value: float) -> None:
    with pytest.raises(
        ConfigError, match=r"config field 'train_slowdown': must be a finite number >= 1"
    ):
        NodeConfig(train_slowdown=value).validated()


def test_config_field_from_a_file_or_flags() -> None:
    assert coerce({"train-slowdown": 3})["train_slowdown"] == 3
    with pytest.raises(ConfigError, match="train_slowdown"):
        coerce({"train_slowdown": "fast"})
    assert NodeConfig().train_slowdown == 1.0


# ---- nodes on a mock clock ---------------------------------------------------------------

FIT_SECONDS = 0.05  # real seconds each local training takes (a sleep: measurable, steady)


@pytest.fixture
def steady_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every local training takes FIT_SECONDS of real time: inline training takes none of
    the mock clock's, so what the slow node adds to it is exactly its wait."""
    fit = SoftmaxRegression.fit

    def slow_fit(self: SoftmaxRegression, *args: Any, **kwargs: Any) -> float:
        time.sleep(FIT_SECONDS)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(SoftmaxRegression, "fit", slow_fit)


def run(nodes: list[Node]) -> float:
    """Run the nodes to the end under a mock clock; the clock seconds it took."""

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.run)
            start = trio.current_time()
            for node in nodes:
                await node.done.wait()
            nursery.cancel_scope.cancel()
            return trio.current_time() - start

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


PROTOCOL = {
    "round_timeout": 30.0,
    # Shorter than the slow node's wait (4 x 0.05 s): peers would drop it as dead if it
    # stopped heartbeating while it waits.
    "heartbeat_interval": 0.02,
    "heartbeat_timeout": 0.1,
}


@pytest.mark.usefixtures("steady_training")
def test_the_slow_node_trains_longer_and_the_rounds_wait_for_it(tmp_path: Path) -> None:
    rounds, factor = 4, 5.0
    fast_run = build_nodes(parse_scenario(scenario(protocol=PROTOCOL)), tmp_path / "fast")
    fast_clock = run(fast_run)
    slow_run = build_nodes(
        parse_scenario(scenario({**SLOW, "factor": factor}, protocol=PROTOCOL)), tmp_path / "slow"
    )
    slow_clock = run(slow_run)

    def train_s(node: Node) -> list[float]:
        return [float(row["timing"]["train_s"]) for row in node.history]

    for node in [*fast_run, *slow_run]:
        assert [row["round"] for row in node.history] == list(range(rounds))
        # quorum 1.0: every round heard both others, nobody timed out or was dropped
        assert all(row["peers_heard"] == 2 and not row["timed_out"] for row in node.history)
        assert node.counters["timeouts"] == 0
    slow = slow_run[1]
    assert slow.config.train_slowdown == factor and fast_run[1].config.train_slowdown == 1.0
    # The slow node reports the slow device's seconds: factor x what training took.
    assert min(train_s(slow)) >= factor * FIT_SECONDS
    assert min(train_s(slow)) > 3 * max(train_s(slow_run[0]) + train_s(slow_run[2]))
    waits = [s * (factor - 1) / factor for s in train_s(slow)]  # its trio.sleep per round
    # Its own rounds and, with synchronous rounds, every other node's take at least that
    # long on the clock: they wait for its update.
    for node in slow_run:
        seconds = [float(row["seconds"]) for row in node.history]
        assert all(s >= w - 1e-3 for s, w in zip(seconds, waits, strict=True)), (seconds, waits)
    assert slow_clock >= sum(waits) - 1e-3
    # Without the fault, inline training takes no clock time at all.
    assert fast_clock < 0.5 * sum(waits), (fast_clock, waits)
    assert all(
        float(row["seconds"]) < 0.5 * min(waits) for node in fast_run for row in node.history
    )
    # The slow node still learns, and mixes with the others as before.
    final = [np.asarray(node.machine.params) for node in slow_run]
    assert all(np.allclose(final[0], p) for p in final[1:])


# ---- real processes --------------------------------------------------------------------


def test_process_runner_slows_the_chosen_node(tmp_path: Path) -> None:
    spec = tmp_path / "slow.toml"
    spec.write_text(
        'name = "slow"\nnodes = 3\nrounds = 3\n'
        "[protocol]\nround_timeout = 20.0\nheartbeat_interval = 0.5\nheartbeat_timeout = 3.0\n"
        '[[faults]]\nkind = "slow"\nfactor = 20\nnodes = [1]\n'
    )
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "p2pfl", "scenario", "run", str(spec), "--out", str(out), "--json"],
        capture_output=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode() + res.stdout.decode()
    command = (out / "nodes" / "n1" / "command.txt").read_text()
    assert "--train-slowdown 20.0" in command
    assert "--train-slowdown" not in (out / "nodes" / "n0" / "command.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [f["label"] for f in metrics["faults"]] == ["slow x20 (n1)"]

    def train_s(name: str) -> float:
        rows = metrics["nodes"][name]["rounds"]
        assert len(rows) == 3
        return float(np.median([row["timing"]["train_s"] for row in rows]))

    # 20 x the same training: even a noisy machine keeps it well apart.
    assert train_s("n1") > 4 * max(train_s("n0"), train_s("n2"))
