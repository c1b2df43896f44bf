"""End-to-end scenario runs: real node processes from the CLI, and many in-process nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfl.scenario.cli import main as scenario_main

SMALL = """
name = "{name}"
nodes = {nodes}
rounds = {rounds}
[topology]
kind = "{kind}"
{extra}
[training]
epochs = 1
[protocol]
round_timeout = 5.0
heartbeat_interval = 0.5
heartbeat_timeout = 3.0
"""


def _scenario(tmp_path: Path, *, nodes: int = 3, rounds: int = 2, kind: str = "full",
              extra: str = "", name: str = "e2e") -> Path:  # fmt: skip
    path = tmp_path / f"{name}.toml"
    path.write_text(SMALL.format(name=name, nodes=nodes, rounds=rounds, kind=kind, extra=extra))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pfl", "scenario", "run", *args]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    assert callable(predicate)
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


def _node_pids(out: Path, nodes: int) -> list[int]:
    try:
        doc = json.loads((out / "pids.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    pids = list(doc["nodes"].values())
    return pids if len(pids) == nodes else []


def _all_trained(out: Path, nodes: int) -> bool:
    files = [out / "nodes" / f"n{i}" / "metrics.jsonl" for i in range(nodes)]
    return all(f.exists() and f.read_text().strip() for f in files)


@pytest.fixture
def runner_cleanup() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Never let a failing test leave a runner (and so its nodes) behind."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_process_scenario_from_cli_writes_all_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = subprocess.run(
        _cli(str(_scenario(tmp_path)), "--out", str(out), "--json"),
        capture_output=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode() + res.stdout.decode()
    result = json.loads(res.stdout)
    assert result["ok"] is True and result["rounds_completed_min"] == 2
    assert result["accuracy_mean"] > 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "processes" and metrics["complete"] is True
    assert sorted(metrics["nodes"]) == ["n0", "n1", "n2"]
    peer_ids = {rec["peer_id"] for rec in metrics["nodes"].values()}
    assert len(peer_ids) == 3 and None not in peer_ids
    for rec in metrics["nodes"].values():
        assert len(rec["rounds"]) == 2 and rec["exit_code"] == 0
        assert rec["rounds"][-1]["bytes_sent"] > 0
    assert (out / "accuracy.png").read_bytes().startswith(b"\x89PNG")
    pids = _node_pids(out, 3)
    assert pids and not any(_alive(pid) for pid in pids)


def test_sigint_to_runner_leaves_no_node_behind(
    tmp_path: Path, runner_cleanup: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "out"
    runner = subprocess.Popen(
        _cli(str(_scenario(tmp_path, nodes=2, rounds=10_000)), "--out", str(out), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    runner_cleanup.append(runner)
    _wait_for(lambda: _node_pids(out, 2) and _all_trained(out, 2), "nodes to finish a round")
    pids = _node_pids(out, 2)
    assert all(_alive(pid) for pid in pids)
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 130, err.decode()
    assert b"interrupted" in err
    assert not any(_alive(pid) for pid in pids)
    partial = json.loads((out / "metrics.json").read_text())
    assert partial["complete"] is False and partial["summary"]["final"]["rounds_completed_min"] >= 1


def test_node_dying_early_fails_the_run_with_its_log(
    tmp_path: Path, runner_cleanup: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "out"
    runner = subprocess.Popen(
        _cli(str(_scenario(tmp_path, nodes=2, rounds=10_000)), "--out", str(out), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    runner_cleanup.append(runner)
    _wait_for(lambda: _node_pids(out, 2) and _all_trained(out, 2), "nodes to finish a round")
    pids = _node_pids(out, 2)
    os.kill(pids[1], signal.SIGKILL)
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 1
    text = err.decode()
    assert "node n1 exited early" in text and "node.log" in text and "  | " in text
    assert not any(_alive(pid) for pid in pids)


def test_fifty_nodes_in_process(tmp_path: Path) -> None:
    path = _scenario(tmp_path, nodes=50, kind="kregular", extra="degree = 4", name="fifty")
    out = tmp_path / "out"
    assert scenario_main(["run", str(path), "--in-process", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "in-process" and len(metrics["nodes"]) == 50
    assert all(len(rec["rounds"]) == 2 for rec in metrics["nodes"].values())
    assert len({rec["peer_id"] for rec in metrics["nodes"].values()}) == 50
    assert all(rec["rounds"][-1]["peers_heard"] >= 1 for rec in metrics["nodes"].values())
    assert (out / "accuracy.png").exists()


def test_bad_scenario_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('nodes = 4\n[topology]\nkind = "kregular"\ndegree = 9\n')
    assert scenario_main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "topology.degree: must be < nodes (4)" in capsys.readouterr().err


def test_non_empty_out_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    (out / "nodes").mkdir(parents=True)
    assert scenario_main(["run", str(_scenario(tmp_path)), "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
