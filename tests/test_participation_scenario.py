"""`[[participation]]` in scenarios: some nodes train only under device conditions."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from p2pfl.scenario import parse_scenario
from p2pfl.scenario.inprocess import run_in_process
from p2pfl.scenario.report import build_metrics, summary_table
from p2pfl.scenario.schema import ScenarioError


def doc(participation: Any) -> dict[str, Any]:
    return {
        "name": "part",
        "nodes": 4,
        "rounds": 4,
        "model": {"name": "mlp", "hidden": 16},
        "training": {"epochs": 2},
        "participation": participation,
    }


def test_the_conditions_reach_the_chosen_nodes_only() -> None:
    s = parse_scenario(doc([{"nodes": [1, 3], "when": ["cpu_below:50", "hours:22-7"]}]))
    values = s.node_config_values(
        [f"mem:n{i}" for i in range(4)], [Path(f"n{i}") for i in range(4)]
    )
    assert [v.get("train_when") for v in values] == [
        None, ("cpu_below:50", "hours:22-7"), None, ("cpu_below:50", "hours:22-7")
    ]  # fmt: skip
    every = parse_scenario(doc({"when": ["ac_power"]}))  # one table, every node
    assert every.participation[0].nodes == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("participation", "where", "message"),
    [
        ([{"nodes": [1]}], "participation[0].when", "non-empty list"),
        ([{"when": ["cpu_below:150"]}], "participation[0].when", "percentage"),
        ([{"when": ["sunny"]}], "participation[0].when", "unknown condition"),
        ([{"nodes": [9], "when": ["ac_power"]}], "participation[0].nodes", "not in 0..3"),
        ([{"nodes": [1], "when": ["ac_power"], "often": 2}], "participation[0].often", ""),
        (
            [{"nodes": [1], "when": ["ac_power"]}, {"nodes": [1, 2], "when": ["hours:1-2"]}],
            "participation[1].nodes",
            "already",
        ),
        ("ac_power", "participation", "tables"),
    ],
)
def test_bad_participation_tables_name_their_place(
    participation: Any, where: str, message: str
) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(doc(participation))
    assert where in str(info.value) and message in str(info.value)


def test_nodes_outside_their_hours_sit_out_and_the_report_counts_it(tmp_path: Path) -> None:
    hour = datetime.datetime.now().hour
    never_now = f"hours:{(hour + 2) % 24}-{(hour + 3) % 24}"  # an hour from now at least
    s = parse_scenario(doc([{"nodes": [2, 3], "when": [never_now]}]))
    records, wall = run_in_process(s, tmp_path)
    metrics = build_metrics(s, records, wall_seconds=wall, mode="in-process")
    trained = {n: [r.get("trained") for r in rec["rounds"]] for n, rec in metrics["nodes"].items()}
    assert trained["n0"] == [None] * 4  # no conditions: nothing recorded
    assert trained["n2"] == trained["n3"] == [False] * 4
    # They sat out but still aggregated: their models are the federation's.
    assert min(rec["rounds"][-1]["accuracy"] for rec in metrics["nodes"].values()) > 0.6
    assert "participation: 8 node-rounds sat out on 2 nodes" in str(summary_table(metrics).caption)
