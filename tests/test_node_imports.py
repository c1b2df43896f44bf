"""A plain node loads only what its config needs (issue 17, "a lean node process").

Every module a node imports stays resident for its whole life, in each of the
processes a scenario starts; so a node without mDNS, compression, secure aggregation
or a scenario must not load zeroconf, zstandard, p2pfl.secure or p2pfl.scenario, and
no node ever loads matplotlib or rich. Checked on a real node process on loopback,
with the interpreter's own list of imports (`-X importtime`).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from p2pfl.cli import build_parser
from p2pfl.scenario.report import build_metrics, summary_table
from p2pfl.scenario.schema import parse_scenario

START_TIMEOUT = 60.0  # seconds: a generous bound, only so a hung node cannot hang the test


def imported_by_node(data_dir: Path, *flags: str) -> list[str]:
    """Modules a real `p2pfl node` process imported by the time it listens."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-X", "importtime", "-m", "p2pfl", "node"),
            *("--listen", "127.0.0.1:0", "--no-mdns", "--rounds", "0"),
            *("--data-dir", str(data_dir), *flags),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(START_TIMEOUT, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "p2pfl.node: node " in line and " listening on " in line:
                break
        else:
            raise AssertionError("node ended before listening:\n" + "".join(lines[-20:]))
        proc.send_signal(signal.SIGTERM)
        lines.extend(proc.stderr)
        proc.wait(timeout=START_TIMEOUT)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [
        line.split("|")[2].strip()
        for line in lines
        if line.startswith("import time:") and line.count("|") == 2 and "cumulative" not in line
    ]


def test_a_plain_node_imports_only_what_its_config_needs(tmp_path: Path) -> None:
    modules = imported_by_node(tmp_path)
    assert "p2pfl.node.daemon" in modules and "trio" in modules  # the parse saw the node
    unwanted = ("zstandard", "zeroconf", "matplotlib", "rich", "p2pfl.secure", "p2pfl.scenario")
    loaded = {m for m in modules if any(m == u or m.startswith(f"{u}.") for u in unwanted)}
    assert sorted(loaded) == []


def test_secure_aggregation_still_loads_its_modules(tmp_path: Path) -> None:
    """The lazy import is taken when the config asks for it (and the node starts)."""
    modules = imported_by_node(tmp_path, "--secure-aggregation")
    assert "p2pfl.node.secure_rounds" in modules and "p2pfl.secure.admission" in modules


def test_help_lists_every_command_without_building_them() -> None:
    parser = build_parser(only="")
    names = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert sorted(names) == ["keys", "node", "scenario", "status"]
    # The full parser and a lazily built one parse a subcommand's flags alike.
    for argv in (["scenario", "run", "x.toml", "--json"], ["status", "--json"]):
        assert vars(build_parser().parse_args(argv)) == vars(
            build_parser(only=argv[0]).parse_args(argv)
        )


def test_process_scenario_table_reports_peak_rss_per_node() -> None:
    s = parse_scenario({"name": "rss", "nodes": 2, "rounds": 1})
    row = {"round": 1, "accuracy": 0.5, "bytes_sent": 10, "bytes_received": 10}
    nodes = {
        "node-0": {"rounds": [row], "peak_rss_bytes": 40 * 2**20},
        "node-1": {"rounds": [row], "peak_rss_bytes": 60 * 2**20},
    }
    metrics = build_metrics(s, nodes, wall_seconds=1.0, mode="processes")
    assert "peak RSS per node: mean 50.0 MiB, max 60.0 MiB" in str(summary_table(metrics).caption)
    metrics = build_metrics(s, {k: {"rounds": [row]} for k in nodes}, wall_seconds=1.0, mode="x")
    assert "RSS" not in str(summary_table(metrics).caption)
