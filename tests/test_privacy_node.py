"""Node-level DP in running nodes: in-process federations under a mock clock."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from rich.console import Console
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import ConfigError
from p2pfl.control.render import render_status
from p2pfl.datadir import DataDir
from p2pfl.privacy.accountant import epsilon_spent
from p2pfl.privacy.node import STATE_FILE
from p2pfl.scenario.report import summarize, summary_table
from p2pfl.transport.memory import MemoryNetwork

pytest.importorskip("dp_accounting")

NOISE = 2.0
DELTA = 1e-5
AFFORDED = 3  # rounds the budget below pays for


def _budget() -> float:
    """Between the epsilon of AFFORDED rounds and one more: exactly AFFORDED are released."""
    low = epsilon_spent([(NOISE, AFFORDED)], DELTA)
    return (low + epsilon_spent([(NOISE, AFFORDED + 1)], DELTA)) / 2


async def test_budget_is_reported_per_round_and_enforced(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    budget = _budget()
    nodes = make_nodes(
        tmp_path, 3, MemoryNetwork(), rounds=6, dp_epsilon=budget, dp_noise=NOISE, dp_clip=0.5
    )
    with caplog.at_level(logging.WARNING, logger="p2pfl.node"):
        await run_until_done(nodes)
    expected = [epsilon_spent([(NOISE, min(r + 1, AFFORDED))], DELTA) for r in range(6)]
    for node in nodes:
        rows = node.all_rows()
        assert [r["round"] for r in rows] == list(range(6))  # every round ran
        assert not any(r["timed_out"] for r in rows)  # nobody waited for the spent nodes
        spent = [r["privacy"]["epsilon"] for r in rows]
        assert spent == pytest.approx(expected, rel=1e-5)
        assert max(spent) <= budget
        assert [r["privacy"]["rounds"] for r in rows] == [1, 2, 3, 3, 3, 3]
        assert [r["privacy"]["exhausted"] for r in rows] == [False, False, True, True, True, True]
        status = node.status()["privacy"]
        assert status["stopped_at"] == AFFORDED and status["budget"] == budget
        out = io.StringIO()
        Console(file=out, width=200, color_system=None).print(render_status(node.status()))
        assert "privacy SPENT" in out.getvalue() and f"of {budget:.3f}" in out.getvalue()
    said = [r for r in caplog.records if r.getMessage().startswith("privacy budget spent")]
    assert len(said) == 3  # once per node, not once per round
    # A spent node gives back its start model untrained, and is not charged for it.
    params = nodes[0].machine.params
    new, seconds = await nodes[0].learner.train(99, params)
    assert new is params and seconds == 0.0
    assert nodes[0].learner.privacy is not None
    assert nodes[0].learner.privacy.budget.rounds == AFFORDED
    # The scenario summary carries it to metrics.json and the table.
    summary = summarize({f"n{i}": n.all_rows() for i, n in enumerate(nodes)}, 1.0)
    assert summary["privacy"]["epsilon_max"] == pytest.approx(expected[-1], rel=1e-5)
    assert summary["privacy"]["exhausted_nodes"] == ["n0", "n1", "n2"]
    assert [r["epsilon_max"] for r in summary["per_round"]] == pytest.approx(expected, rel=1e-5)
    text = io.StringIO()
    table = summary_table({"summary": summary, "mode": "in-process", "wall_seconds": 1.0})
    Console(file=text, width=200, color_system=None).print(table)
    assert "eps max" in text.getvalue() and "budget spent on 3 nodes" in text.getvalue()


async def test_what_leaves_the_node_is_the_clipped_update(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A tiny clip and almost no noise: however far local training goes, each round moves
    the models by at most about the clip, so after 3 rounds they are still near the
    initial model (without DP the same federation moves them by far more)."""
    clip, rounds = 1e-4, 3
    nodes = make_nodes(
        tmp_path / "dp", 3, MemoryNetwork(), rounds=rounds, dp_noise=1e-3, dp_clip=clip
    )
    init = nodes[0].machine.params.copy()
    await run_until_done(nodes)
    moved = max(float(np.linalg.norm(n.machine.params - init)) for n in nodes)
    # rounds * (clip + noise norm ~ 1e-3 * clip * sqrt(params)), with float32 slack
    assert moved <= rounds * clip * 1.2
    plain = make_nodes(tmp_path / "plain", 3, MemoryNetwork(), rounds=rounds)
    await run_until_done(plain)
    assert max(float(np.linalg.norm(n.machine.params - init)) for n in plain) > 100 * moved


async def test_restart_keeps_the_spent_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    budget = _budget()
    fields = {"dp_epsilon": budget, "dp_noise": NOISE}
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=2, **fields)
    await run_until_done(nodes)
    before = nodes[1].status()["privacy"]
    assert before["rounds"] == 2
    # The same data dirs, planning more rounds: the budget goes on from what was spent.
    again = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=5, **fields)
    after = again[1].status()["privacy"]
    assert after["rounds"] == 2 and after["epsilon"] == pytest.approx(before["epsilon"])
    await run_until_done(again)
    rows = again[1].all_rows()
    assert rows[-1]["round"] == 4
    assert rows[-1]["privacy"]["rounds"] == AFFORDED  # 2 before the restart + 1 after
    assert rows[-1]["privacy"]["epsilon"] <= budget


async def test_an_unreadable_budget_file_stops_the_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(tmp_path, 2, MemoryNetwork(), rounds=1, dp_noise=NOISE)
    await run_until_done(nodes)
    (tmp_path / "n0" / STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be known") as info:
        make_nodes(tmp_path, 1, MemoryNetwork(), total=2, rounds=1, dp_noise=NOISE)
    assert "\n" not in str(info.value)
    DataDir.open(tmp_path / "n0").close()  # released: the operator can fix it and restart


def test_privacy_state_is_written_before_the_update_leaves(tmp_path: Path) -> None:
    """The spent budget is on disk when `release` returns (a crash right after sending
    must not forget the round)."""
    from p2pfl.privacy.node import NodePrivacy

    privacy = NodePrivacy(target=None, delta=DELTA, clip=1.0, noise_multiplier=NOISE)
    with DataDir.open(tmp_path / "d") as datadir:
        privacy.attach(datadir, 0)
        privacy.release(0, np.zeros(3, np.float32), np.ones(3, np.float32))
    assert '"history": [[2.0, 1]]' in (tmp_path / "d" / STATE_FILE).read_text()
