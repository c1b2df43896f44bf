"""The `p2pfl` command line: real node processes on loopback, keys, config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pfl.cli import main
from p2pfl.control.client import ControlError, query
from p2pfl.scenario.processes import free_ports


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_three_node_processes_run_two_rounds(tmp_path: Path) -> None:
    ports = free_ports(3)
    procs = []
    try:
        for i in range(3):
            peers = [f"--peer=127.0.0.1:{p}" for j, p in enumerate(ports) if j != i]
            cmd = [
                sys.executable,
                "-m",
                "p2pfl",
                "node",
                "--data-dir",
                str(tmp_path / f"n{i}"),
                "--listen",
                f"127.0.0.1:{ports[i]}",
                *peers,
                "--nodes",
                "3",
                "--node-index",
                str(i),
                "--rounds",
                "2",
                "--min-peers",
                "2",
                "--round-timeout",
                "20",
            ]
            log = (tmp_path / f"n{i}.log").open("w")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

        def all_done() -> bool:
            for i in range(3):
                try:
                    st = query(tmp_path / f"n{i}" / "control.sock")
                except ControlError:
                    return False
                if st["round"]["phase"] != "done":
                    return False
            return True

        assert wait_for(all_done, 60), [(tmp_path / f"n{i}.log").read_text() for i in range(3)]
        statuses = [query(tmp_path / f"n{i}" / "control.sock") for i in range(3)]
        for st in statuses:
            assert st["round"]["current"] == 2
            assert len([p for p in st["peers"] if p["state"] == "connected"]) == 2
            assert st["history"][-1]["peers_heard"] == 2
            assert st["history"][-1]["accuracy"] > 0.8
        # All three agree on the model after the last mean of the same three inputs.
        assert len({st["model"]["hash"] for st in statuses}) == 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=20) for p in procs]
    assert codes == [0, 0, 0]
    for i in range(3):
        rows = [json.loads(line) for line in (tmp_path / f"n{i}" / "metrics.jsonl").open()]
        assert [r["round"] for r in rows] == [0, 1]
        assert not (tmp_path / f"n{i}" / "control.sock").exists()


def test_keys_show_creates_then_reuses_the_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "show", "--data-dir", str(tmp_path), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["peer_id"]
    assert main(["keys", "show", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == first
    assert (tmp_path / "identity.key").stat().st_mode & 0o777 == 0o600


def test_bad_config_file_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nround_timeout = "soon"\n')
    assert main(["node", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "round_timeout" in err and "number" in err

    cfg.write_text("roundz = 3\n")
    assert main(["node", "--config", str(cfg)]) == 2
    assert "roundz" in capsys.readouterr().err


def test_bad_flag_value_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--quorum", "1.5", "--data-dir", "/nonexistent/x"]) == 2
    assert "quorum" in capsys.readouterr().err


def test_p2pfl_status_through_the_cli_stays_light(tmp_path: Path) -> None:
    """`p2pfl status` must start fast: the whole CLI path imports no trio/numpy/zeroconf."""
    code = (
        "import sys\n"
        "from p2pfl.cli import main\n"
        f"rc = main(['status', '--socket', {str(tmp_path / 'none.sock')!r}, '--json'])\n"
        "heavy = [m for m in ('trio', 'numpy', 'zeroconf', 'cryptography') if m in sys.modules]\n"
        "print(rc, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1 []", (out.stdout, out.stderr)
    assert "no p2pfl node" in out.stderr or "not running" in out.stderr
