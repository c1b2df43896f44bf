"""Scenario papercuts (issue 18, deliverable 4): each test reproduces one reported bug.

Partial reports after early failures, faults at the declared round, usage errors exiting
2, an 80-column progress bar, the plot's axes, cumulative byte counters, waiting for the
known neighbours before round 0, and the digits data shipped with the package.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from p2pfl.learning import datasets
from p2pfl.scenario import processes
from p2pfl.scenario.cli import main as scenario_main
from p2pfl.scenario.cli import run_scenario
from p2pfl.scenario.faults import parse_faults
from p2pfl.scenario.report import RoundProgress, build_metrics, metric_figure
from p2pfl.scenario.schema import RunFailed, Scenario, ScenarioError, parse_scenario

BASE = {"nodes": 3, "rounds": 4, "topology": {"kind": "full"}}


def _scenario(**extra: Any) -> Scenario:
    return parse_scenario({**BASE, **extra}, default_name="papercut")


# ---- a partial metrics.json after Ctrl-C or a failure before the first round -------------


@pytest.mark.parametrize("error", [RunFailed("node n1 exited early"), KeyboardInterrupt()])
def test_failure_before_first_round_still_writes_partial_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    def fail(scenario: Scenario, out: Path, **kwargs: Any) -> Any:
        (out / "nodes" / "n0").mkdir(parents=True)  # started, but no round finished
        raise error

    monkeypatch.setattr(processes, "run_processes", fail)
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        run_scenario(_scenario(), out, show_progress=False)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["complete"] is False
    assert doc["summary"]["final"]["rounds_completed_max"] == 0
    assert set(doc["nodes"]) == {"n0", "n1", "n2"}


def test_unexpected_error_also_leaves_partial_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(scenario: Scenario, out: Path, **kwargs: Any) -> Any:
        row = {"round": 0, "accuracy": 0.5, "bytes_sent": 10, "bytes_received": 10}
        (out / "nodes" / "n0").mkdir(parents=True)
        (out / "nodes" / "n0" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(processes, "run_processes", fail)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        run_scenario(_scenario(), out, show_progress=False)
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["complete"] is False and len(doc["nodes"]["n0"]["rounds"]) == 1


# ---- faults fire at the declared round --------------------------------------------------


class _FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def _fake_node(tmp_path: Path, name: str, pid: int) -> processes.NodeProcess:
    data_dir = tmp_path / name
    data_dir.mkdir()
    return processes.NodeProcess(name, data_dir, [], _FakeProc(pid), io.BytesIO())  # type: ignore[arg-type]


def test_crash_fires_in_the_declared_round_between_sweeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The victim enters round 6 while the runner would otherwise sleep until its next
    sweep of every node (by which time a fast federation is rounds further): the runner
    watches an imminent victim closely and kills it in round 6."""
    events = parse_faults([{"at_round": 6, "kind": "crash", "nodes": [1]}], 3, 10)
    procs = [_fake_node(tmp_path, f"n{i}", 1000 + i) for i in range(3)]
    rounds = {1000: 5, 1001: 5, 1002: 5}
    killed: list[tuple[int, int]] = []
    queries = {"n": 0}

    def query(p: processes.NodeProcess) -> dict[str, Any]:
        # Every node moves on one round every 3 queries of the victim: a fast federation.
        if p.name == "n1":
            queries["n"] += 1
            if queries["n"] % 3 == 0:
                for pid in rounds:
                    rounds[pid] += 1
        return {"round": {"current": rounds[p.proc.pid], "phase": "training"}}

    monkeypatch.setattr(processes, "_query", query)
    monkeypatch.setattr(processes, "_killpg", lambda pid, sig: killed.append((pid, rounds[pid])))
    chaos = processes._Chaos(events, procs, tmp_path, 0.0)
    for p in procs:
        p.status = query(p)
    chaos.step()
    assert killed == []  # round 5: not yet
    now = [0.0]  # a fake clock that only sleeping advances

    def sleep(seconds: float) -> None:
        now[0] += seconds

    chaos.wait(processes.POLL_INTERVAL, sleep=sleep, clock=lambda: now[0])
    assert killed == [(1001, 6)]
    assert procs[1].extra["events"][0]["round"] == 6


def test_crash_victim_far_from_its_round_is_still_watched_between_sweeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds of 65 ms (as in a fast 8-node run) and the victim at round 0: between two
    sweeps the runner must keep an eye on it, or round 6 passes unseen."""
    events = parse_faults([{"at_round": 6, "kind": "crash", "nodes": [0]}], 2, 10)
    procs = [_fake_node(tmp_path, f"n{i}", 2000 + i) for i in range(2)]
    now = [0.0]
    killed: list[int] = []

    def current() -> int:
        return int(now[0] / 0.065)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(
        processes, "_query", lambda p: {"round": {"current": current(), "phase": "training"}}
    )
    monkeypatch.setattr(processes, "_killpg", lambda pid, sig: killed.append(current()))
    chaos = processes._Chaos(events, procs, tmp_path, 0.0)
    for p in procs:
        p.status = processes._query(p)
    chaos.step()
    for _ in range(3):  # three pauses between sweeps, no sweep in between
        chaos.wait(processes.POLL_INTERVAL, sleep=sleep, clock=lambda: now[0])
    assert killed == [6]


# ---- usage errors exit 2 ----------------------------------------------------------------


def test_in_process_with_crash_faults_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "crash.toml"
    path.write_text(
        'nodes = 3\nrounds = 4\n[topology]\nkind = "full"\n'
        '[[faults]]\nat_round = 1\nkind = "crash"\nnodes = [1]\n'
    )
    code = scenario_main(["run", str(path), "--in-process", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "needs real processes" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything ran


# ---- the progress bar fits 80 columns ---------------------------------------------------


def test_progress_bar_keeps_rounds_and_note_on_80_columns() -> None:
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    name = "byzantine-mix-sparse-with-a-rather-long-descriptive-name"
    bar = RoundProgress(console, name, rounds=100, nodes=128)
    rows = [{"round": 40, "accuracy": 0.912}] * 100
    bar.update(41, rows)
    console.print(bar.renderable())
    lines = [line for line in console.export_text().splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in lines)
    text = " ".join(lines)
    assert "41/100 rounds" in text
    assert "mean acc 0.912 (100/128 nodes)" in text
    assert "byzantine-mix" in text  # the start of the name is kept


# ---- the plot: integer round ticks, automatic y range -----------------------------------


def _metrics_doc(rows_by_node: dict[str, list[dict[str, Any]]], rounds: int = 5) -> dict[str, Any]:
    scenario = _scenario(rounds=rounds)
    nodes = {name: {"peer_id": None, "rounds": rows} for name, rows in rows_by_node.items()}
    return build_metrics(scenario, nodes, wall_seconds=1.0, mode="processes")


def test_plot_has_integer_round_ticks_and_fits_the_accuracy_range() -> None:
    pytest.importorskip("matplotlib")
    rows = {
        f"n{i}": [{"round": r, "accuracy": 0.90 + 0.01 * r + 0.002 * i} for r in range(5)]
        for i in range(3)
    }
    fig = metric_figure(_metrics_doc(rows))
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)
    bottom, top = ax.get_ylim()
    assert bottom > 0.5, "0.90..0.95 squeezed into the top of a 0..1 axis"
    assert top <= 1.0 and bottom < 0.90 and top > 0.944


# ---- 'sent (all)' never goes down ---------------------------------------------------------


def test_cumulative_bytes_never_go_down_while_a_node_is_down() -> None:
    sent = {
        "n0": [100, 200, 300, 400, 500, 600],
        "n1": [100, 200, 300, 400, 500, 600],
        # n2 is down in rounds 2-3, then restarts with fresh counters (a new process).
        "n2": [100, 200, None, None, 50, 150],
    }
    rows = {
        name: [
            {"round": r, "accuracy": 0.5, "bytes_sent": s, "bytes_received": s}
            for r, s in enumerate(values)
            if s is not None
        ]
        for name, values in sent.items()
    }
    doc = _metrics_doc(rows, rounds=6)
    per_round = [r["bytes_sent"] for r in doc["summary"]["per_round"]]
    assert per_round == sorted(per_round), per_round
    assert per_round == [300, 600, 800, 1000, 1250, 1550]
    assert doc["summary"]["final"]["bytes_sent_total"] == 1550
    assert doc["summary"]["final"]["bytes_received_total"] == 1550


# ---- scenario nodes wait for their known neighbours before round 0 ----------------------


def _min_peers(scenario: Scenario) -> list[int]:
    values = scenario.node_config_values(
        [f"127.0.0.1:{9000 + i}" for i in range(scenario.nodes)],
        [Path(f"n{i}") for i in range(scenario.nodes)],
    )
    return [v["min_peers"] for v in values]


def test_nodes_wait_for_all_their_neighbours_by_default() -> None:
    assert _min_peers(_scenario(nodes=6, topology={"kind": "ring"})) == [2] * 6
    assert _min_peers(_scenario(nodes=5)) == [4] * 5
    mdns = _scenario(nodes=4, discovery="mdns")
    assert _min_peers(mdns) == [3] * 4  # no --peer flags, but the node count is known


def test_protocol_min_peers_overrides_the_neighbour_count() -> None:
    ring = _scenario(nodes=6, topology={"kind": "ring"}, protocol={"min_peers": 1})
    assert ring.protocol.min_peers == 1
    assert _min_peers(ring) == [1] * 6
    assert _min_peers(_scenario(nodes=4, protocol={"min_peers": 0})) == [0] * 4
    with pytest.raises(ScenarioError, match=r"protocol.min_peers: must be in 0..2"):
        _scenario(nodes=6, topology={"kind": "ring"}, protocol={"min_peers": 3})


# ---- the default dataset after a plain install ------------------------------------------


def test_digits_load_without_scikit_learn(tmp_path: Path) -> None:
    """In a fresh interpreter where `import sklearn` fails, as after `pip install -e .`."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'sklearn' or name.startswith('sklearn.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from p2pfl.learning.datasets import load_dataset\n"
        "d = load_dataset('digits')\n"
        "print(d.x_train.shape[0] + d.x_test.shape[0], d.n_features, d.n_classes)\n"
        "assert 'sklearn' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1797", "64", "10"]


def test_shipped_digits_are_exactly_scikit_learns() -> None:
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed: nothing to compare against")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x, y = datasets._digits_raw()
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.asarray(bunch.data, dtype=np.float32))
    np.testing.assert_array_equal(y, np.asarray(bunch.target, dtype=np.int64))


def test_shipped_digits_carry_their_attribution() -> None:
    notice = (Path(datasets.__file__).parent / "data" / "DIGITS-LICENSE.txt").read_text()
    assert "CC BY 4.0" in notice and "Optical Recognition of Handwritten Digits" in notice
