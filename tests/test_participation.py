"""Device-aware participation: conditions parse or are refused in one line, the decision
names the failing condition, and a node outside its conditions sits rounds out with a
zero update while the federation goes on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import trio.testing
from rich.console import Console
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.control.render import render_status
from p2pfl.node.participation import Participation, Readings, decide, parse_conditions
from p2pfl.transport.memory import MemoryNetwork


def test_conditions_parse_and_bad_ones_are_refused() -> None:
    got = parse_conditions(["ac_power", "cpu_below:50", "hours:22-7"])
    assert [str(c) for c in got] == ["ac_power", "cpu_below:50", "hours:22-7"]
    for bad in ("battery", "cpu_below:0", "cpu_below:x", "hours:5-5", "hours:25-3", "ac_power:1"):
        with pytest.raises(ValueError):
            parse_conditions([bad])
    with pytest.raises(ConfigError) as info:
        NodeConfig(train_when=("hours:9",)).validated()
    assert info.value.field == "train_when" and "\n" not in str(info.value)


def test_the_decision_names_the_first_failing_condition() -> None:
    conds = parse_conditions(["ac_power", "cpu_below:50", "hours:22-7"])
    assert decide(conds, Readings(on_ac=True, other_cpu_percent=10.0, hour=23)) == (True, "")
    assert decide(conds, Readings(True, 10.0, 3))[0]  # the window wraps midnight
    ok, why = decide(conds, Readings(False, 10.0, 23))
    assert not ok and "battery" in why
    ok, why = decide(conds, Readings(True, 80.0, 23))
    assert not ok and "CPU busy: 80%" in why
    ok, why = decide(conds, Readings(True, 10.0, 12))
    assert not ok and "outside hours 22-7" in why


class ScriptedDevice:
    """Readings from a script: the device goes on battery for rounds 1 and 2."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self) -> Readings:
        self.calls += 1
        return Readings(on_ac=self.calls not in (2, 3), other_cpu_percent=None, hour=12)


async def test_a_node_on_battery_sits_rounds_out_and_comes_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=5)
    learner = nodes[0].learner
    learner.participation = Participation(parse_conditions(["ac_power"]), ScriptedDevice())
    sent: list[tuple[int, bool]] = []
    original = learner.train

    async def spy(round: int, params: np.ndarray) -> tuple[np.ndarray, float]:
        new, seconds = await original(round, params)
        sent.append((round, bool(np.array_equal(new, params))))
        return new, seconds

    learner.train = spy  # type: ignore[method-assign]
    await run_until_done(nodes)
    # Rounds 1 and 2: the start model goes out unchanged (a zero update); others train.
    assert [unchanged for _, unchanged in sorted(sent)] == [False, True, True, False, False]
    for node in nodes:
        rows = node.all_rows()
        assert [r["round"] for r in rows] == list(range(5))
        assert not any(r["timed_out"] for r in rows)  # nobody waited for the idle node
    status = nodes[0].status()["participation"]
    assert status["idle_rounds"] == 2 and status["training"] is True
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(
        render_status({**nodes[0].status(), "participation": {**status, "training": False,
                                                             "reason": "on battery (ac_power)"}})
    )  # fmt: skip
    assert "IDLE: on battery" in out.getvalue()
