"""The rule's guards, fallbacks and per-peer suspicion, seen from real in-memory nodes:
in each round's metrics row, in `status()` and in the human status view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
import trio.testing
from rich.console import Console
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.aggregation import make_rule
from p2pfl.control.render import render_status
from p2pfl.protocol import Aggregated, RoundMachine, RoundSettings
from p2pfl.scenario import parse_scenario
from p2pfl.scenario.report import build_metrics, summary_table
from p2pfl.transport.memory import MemoryNetwork


def rendered(status: dict[str, object]) -> str:
    console = Console(width=200, record=True)
    console.print(render_status(status))
    return " ".join(console.export_text().split())  # the words, not the layout


def test_aggregated_names_the_rows_the_rule_flagged() -> None:
    """Sans-IO: `Aggregated.inputs` lists the rule's rows in its order (ours included),
    so the rule's per-input flags can be attributed to peers."""
    rule = make_rule("self_centered_clipping", f=1)
    m = RoundMachine(
        params=np.zeros(3, dtype=np.float32),
        rule=rule,
        settings=RoundSettings(round_timeout=5.0),
        node_id="m",
    )
    m.start(0.0, ["z", "a", "q"])
    m.trained(0.0, 0, np.zeros(3, dtype=np.float32), 10, ["z", "a", "q"])
    m.receive_update(0.1, "z", 0, np.full(3, 50.0, dtype=np.float32), 10)
    m.receive_update(0.1, "a", 0, np.full(3, 0.1, dtype=np.float32), 10)
    actions = m.receive_update(0.1, "q", 0, np.full(3, -0.1, dtype=np.float32), 10)
    agg = next(a for a in actions if isinstance(a, Aggregated))
    assert agg.inputs == ("a", "m", "q", "z")
    assert rule.last_report is not None and rule.last_report.flagged is not None
    flagged = [p for p, hit in zip(agg.inputs, rule.last_report.flagged, strict=True) if hit]
    assert flagged == ["z"]


async def test_a_sign_flippers_suspicion_rises_in_its_neighbours_status(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rounds = 8
    common: dict[str, object] = {
        "rounds": rounds,
        "aggregation": "trimmed_mean",
        "tolerate": 1,
        "lr": 0.05,
    }
    network = MemoryNetwork()
    honest = make_nodes(tmp_path, 4, network, total=5, **common)
    (attacker,) = make_nodes(tmp_path, 1, network, start=4, total=5, attack="sign_flip", **common)
    assert attacker.role == "malicious"
    await run_until_done([*honest, attacker])

    for node in honest:
        status = node.status()
        rob = status["robustness"]
        scores = {p: rec["score"] for p, rec in rob["suspicion"].items()}
        assert set(scores) == {n.id for n in [*honest, attacker] if n is not node}
        assert scores[attacker.id] > 0.9
        assert all(s < 0.5 for p, s in scores.items() if p != attacker.id)
        assert rob["suspects"] == [attacker.id]
        assert rob["suspicion"][attacker.id]["flagged"] == {"trimmed": rounds}
        # Every round's row names the attacker as trimmed; no fallback, no guard.
        assert all(row["rule"]["flagged"] == {attacker.id: "trimmed"} for row in node.history)
        assert rob["fallbacks"] == {} and rob["guards"] == {}
        text = rendered(status)
        assert f"suspicion {attacker.id[:12]} 1.00 (trimmed {rounds} of {rounds})" in text
        assert f"0.00 (0 of {rounds} flagged)" in text
        assert "suspects: 1" in text and "rule fell back" not in text


async def test_fallbacks_and_guards_show_in_rows_status_and_the_human_view(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Krum with f = 1 and buckets of 2 on 4 inputs: 2 buckets cannot give Krum its 5
    inputs, so bucketing is skipped (a guard); 4 inputs are still too few, so the rule
    falls back to the median (a fallback). Both every round, both visible."""
    rounds = 3
    nodes = make_nodes(
        tmp_path,
        4,
        MemoryNetwork(),
        rounds=rounds,
        aggregation="krum",
        tolerate=1,
        aggregation_options={"bucket_size": 2},
    )
    await run_until_done(nodes)
    for node in nodes:
        for row in node.history:
            assert row["rule"]["fallback"] == "too_few_inputs"
            assert row["rule"]["guards"] == ["bucket_size_reduced"]
            assert "krum with f=1 needs 5 inputs, had 4" in row["rule"]["detail"]
        status = node.status()
        rob = status["robustness"]
        assert rob["rule"] == "krum+bucketing(2)" and rob["need"] == 5
        assert rob["fallbacks"] == {"too_few_inputs": rounds}
        assert rob["guards"] == {"bucket_size_reduced": rounds}
        assert rob["suspicion"] == {}  # fallback rounds say nothing about any peer
        text = rendered(status)
        assert f"rule fell back {rounds} of {rounds} rounds: too_few_inputs {rounds}" in text
        assert f"rule guards bucket_size_reduced {rounds} (4 inputs in buckets of 2" in text


async def test_a_clean_run_shows_no_rule_lines(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=2, aggregation="median")
    await run_until_done(nodes)
    status = nodes[0].status()
    rob = status["robustness"]
    assert rob["fallbacks"] == {} and rob["guards"] == {} and rob["suspicion"] == {}
    assert all(row["rule"]["flagged"] == {} for row in nodes[0].history)
    text = rendered(status)
    assert "rule fell back" not in text and "rule guards" not in text
    assert "suspicion" not in text


def test_the_scenario_report_counts_rule_events_per_reason() -> None:
    def row(r: int, fallback: str | None, guards: list[str]) -> dict[str, object]:
        rule = {"fallback": fallback, "guards": guards, "detail": None, "flagged": {}}
        return {"round": r, "accuracy": 0.5, "bytes_sent": 0, "rule": rule}

    records = {
        "n0": {"rounds": [row(0, "too_few_inputs", ["bucket_size_reduced"]), row(1, None, [])]},
        "n1": {"rounds": [row(0, None, ["bucket_size_reduced"]), {"round": 1, "accuracy": 0.5}]},
    }
    metrics = build_metrics(parse_scenario({"nodes": 2}), records, wall_seconds=1.0, mode="x")
    assert metrics["summary"]["rule_events"] == {
        "fallbacks": {"too_few_inputs": 1},
        "guards": {"bucket_size_reduced": 2},
        "fallbacks_nodes": ["n0"],
        "guards_nodes": ["n0", "n1"],
    }
    caption = str(summary_table(metrics).caption)
    assert "rule fell back to the median: 1 node-rounds (too_few_inputs 1) on 1 nodes" in caption
    assert "rule guards: 2 node-rounds (bucket_size_reduced 2) on 2 nodes" in caption
    clean = {"n0": {"rounds": [row(0, None, [])]}, "n1": {"rounds": [row(0, None, [])]}}
    quiet = build_metrics(parse_scenario({"nodes": 2}), clean, wall_seconds=1.0, mode="x")
    assert "rule" not in str(summary_table(quiet).caption)
