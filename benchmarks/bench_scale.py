"""Scenario scaling: wall time per round and peak memory per node as N grows.

Run: python benchmarks/bench_scale.py [--quick] [--rounds R] [--full-mesh]

Every point is one `p2pfl scenario run --json` in a fresh child process, so timings
include nothing left over from a previous point and the child's peak RSS is its own:
- in-process (8, 32, 100 nodes): one interpreter, the MemoryNetwork transport; the
  per-node figure is the child's peak RSS divided by N (the interpreter, numpy and the
  dataset are shared, so it falls as N grows);
- real processes (8, 16 nodes): TCP + TLS on loopback; per-node peak RSS is the mean of
  the nodes' VmHWM, which the runner records in metrics.json.
The 8-node in-process run is the baseline every other row is compared with.

The default graph is a random 4-regular one, so the message count grows linearly with
N; `--full-mesh` adds full-mesh rows (messages grow as N^2, and heartbeats with them).
"Round" is the mean over nodes of the node's own round duration, ignoring round 0
(start-up: connecting, first training); "wall" is the whole run, start-up included.
Prints a rich table and writes benchmarks/results/bench_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scale.json"

SCENARIO = """
name = "{name}"
nodes = {nodes}
rounds = {rounds}
seed = 0
[topology]
{topology}
[training]
epochs = 1
[protocol]
round_timeout = 30.0
heartbeat_interval = {heartbeat}
heartbeat_timeout = {heartbeat_timeout}
"""


def run_point(mode: str, nodes: int, rounds: int, kind: str, workdir: Path) -> dict[str, Any]:
    topology = 'kind = "kregular"\ndegree = 4' if kind == "kregular" else 'kind = "full"'
    # A full mesh pings N*(N-1) pairs per interval; keep that from dominating big meshes.
    heartbeat = 1.0 if kind == "kregular" or nodes <= 32 else 5.0
    name = f"{mode}-{kind}-{nodes}"
    path = workdir / f"{name}.toml"
    path.write_text(
        SCENARIO.format(
            name=name,
            nodes=nodes,
            rounds=rounds,
            topology=topology,
            heartbeat=heartbeat,
            heartbeat_timeout=heartbeat * 6,
        )
    )
    out = workdir / name
    argv = [sys.executable, "-m", "p2pfl", "scenario", "run", str(path), "--out", str(out)]
    argv += ["--json", *(["--in-process"] if mode == "in-process" else [])]
    log = workdir / f"{name}.log"
    start = time.perf_counter()
    with log.open("wb") as sink:  # files, not pipes: nothing can fill up and block the child
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the child's own rusage
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{log.read_text()}")
    metrics = json.loads((out / "metrics.json").read_text())
    steady = [r["seconds_mean"] for r in metrics["summary"]["per_round"][1:]]
    node_rss = [
        rec["peak_rss_bytes"] for rec in metrics["nodes"].values() if "peak_rss_bytes" in rec
    ]
    runner_rss = usage.ru_maxrss * 1024  # Linux reports KiB
    per_node_rss = statistics.mean(node_rss) if node_rss else runner_rss / nodes
    final = metrics["summary"]["final"]
    return {
        "mode": mode,
        "topology": kind,
        "nodes": nodes,
        "rounds": rounds,
        "round_s": statistics.mean(steady) if steady else None,
        "wall_s": metrics["wall_seconds"],
        "command_s": round(elapsed, 3),
        "peak_rss_per_node_mb": per_node_rss / 2**20,
        "runner_peak_rss_mb": runner_rss / 2**20,
        "final_accuracy_mean": final["accuracy_mean"],
        "bytes_sent_total": final["bytes_sent_total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer points")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--full-mesh", action="store_true", help="add full-mesh rows")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 6)
    points = [("in-process", n, "kregular") for n in (8, 32, 100)]
    points += [("processes", n, "kregular") for n in (8, 16)]
    if args.full_mesh:
        points += [("in-process", n, "full") for n in (8, 32, 100)]
        points += [("processes", n, "full") for n in (8, 16)]
    if args.quick:
        points = [p for p in points if p[1] <= 32]
    console = Console()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for mode, n, kind in points:
            console.print(f"running {mode} {kind} N={n} ...", style="dim")
            results.append(run_point(mode, n, rounds, kind, Path(tmp)))
    base = results[0]
    table = Table(title=f"scenario scaling ({rounds} rounds, {os.cpu_count()} CPUs)")
    for col in ("mode", "graph", "N", "round s", "x base", "wall s", "RSS/node MB", "acc"):
        table.add_column(col, justify="right")
    for r in results:
        ratio = r["round_s"] / base["round_s"] if r["round_s"] and base["round_s"] else None
        table.add_row(
            r["mode"],
            r["topology"],
            str(r["nodes"]),
            f"{r['round_s']:.3f}" if r["round_s"] is not None else "-",
            f"{ratio:.1f}" if ratio is not None else "-",
            f"{r['wall_s']:.1f}",
            f"{r['peak_rss_per_node_mb']:.1f}",
            f"{r['final_accuracy_mean']:.3f}" if r["final_accuracy_mean"] is not None else "-",
        )
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "bench_scale",
        "rounds": rounds,
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "baseline": "in-process kregular N=8",
        "results": results,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
