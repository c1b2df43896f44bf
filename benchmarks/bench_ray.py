"""The Ray runner's overhead: the same scenario with real processes and on a local Ray.

Run: python benchmarks/bench_ray.py [--nodes 16,64] [--rounds 5] [--out FILE]

Every point is one `p2pfl scenario run --json` (plus `--ray` for the Ray rows) in a
fresh child process, so a Ray row includes starting and stopping a local Ray, as a
user's run does. Columns: "wall" is the child's whole life (interpreter and report
included), "run" is the runner's own `wall_seconds` (for Ray: the local Ray started,
actors placed, nodes started, rounds, nodes stopped, Ray shut down), "RSS/node" the
mean of the nodes' peak RSS from metrics.json (for Ray, the actor process: the node
plus Ray's worker runtime) and "RSS sum" their total. Ray's own daemons (GCS, raylet,
agents) are not in the sum: they are a fixed cost per machine, not per node. The
scenario is a 4-regular graph with the softmax model on digits, so messages grow
linearly with N and the numbers are about the engine, not the learning.
Prints a table and writes benchmarks/results/bench_ray.json (needs `p2pfl[ray]`).
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

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ray.json"

SCENARIO = """
name = "{name}"
nodes = {nodes}
rounds = {rounds}
seed = 0
[topology]
kind = "kregular"
degree = 4
[data]
dataset = "digits"
[model]
name = "softmax"
[protocol]
round_timeout = 60.0
[ray]
num_cpus = 0.25
"""


def run_point(nodes: int, rounds: int, on_ray: bool, work: Path) -> dict[str, Any]:
    """One scenario run in a child process; its timings and the nodes' memory."""
    name = f"{'ray' if on_ray else 'proc'}-{nodes}"
    spec = work / f"{name}.toml"
    spec.write_text(SCENARIO.format(name=name, nodes=nodes, rounds=rounds))
    out = work / name
    argv = [sys.executable, "-m", "p2pfl", "scenario", "run", str(spec), "--json"]
    argv += ["--out", str(out), *(["--ray"] if on_ray else [])]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    line = (done.stdout.strip().splitlines() or ["{}"])[-1]
    result = json.loads(line)
    if not result.get("ok"):
        raise SystemExit(f"{name} failed: {result.get('error')}\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    rss = [n["peak_rss_bytes"] for n in metrics["nodes"].values() if n.get("peak_rss_bytes")]
    return {
        "runner": "ray" if on_ray else "processes",
        "nodes": nodes,
        "rounds": rounds,
        "wall_s": round(wall, 2),
        "run_s": round(metrics["wall_seconds"], 2),
        "rss_node_mib": round(statistics.mean(rss) / 2**20, 1) if rss else None,
        "rss_sum_mib": round(sum(rss) / 2**20, 1) if rss else None,
        "accuracy": metrics["summary"]["final"].get("accuracy_mean"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="16,64", help="comma-separated node counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for n in sizes:
            for on_ray in (False, True):
                rows.append(run_point(n, args.rounds, on_ray, Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr)
    table = Table(title=f"process runner vs Ray runner ({args.rounds} rounds, 4-regular)")
    for col in ("runner", "nodes", "wall s", "run s", "RSS/node MiB", "RSS sum MiB", "acc"):
        table.add_column(col, justify="right")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        table.add_row(
            r["runner"], str(r["nodes"]), f"{r['wall_s']:.1f}", f"{r['run_s']:.1f}",
            str(r["rss_node_mib"]), str(r["rss_sum_mib"]), acc,
        )  # fmt: skip
    Console().print(table)
    doc = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
