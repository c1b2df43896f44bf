"""Stragglers: the asynchronous mode against the synchronous rounds, with and without
slow devices. The table of docs/heterogeneity.md, "Asynchronous mode".

Run: nice python benchmarks/async_stragglers.py [--seeds 0,1] [--rounds 30]

16 real node processes (TLS on loopback) on a random 4-regular graph, digits split
IID, the MLP (64 hidden), 10 local epochs at lr 0.005 per step (0.92 takes about 7
synchronous rounds), the mean rule. Device time is emulated: every node's training
takes 10 times as long as it does here (`[[faults]] kind = "slow"`, factor 10: the
node waits out the rest, using no CPU), as on devices ten times slower than one core
of this machine; otherwise 16 processes on 2 cores would contend for the CPU, and a
slow node's idle wait would only hand its core to the others. Four cells per seed:
`protocol.mode` sync or async, with no slow node or with 4 of them 5 times slower
again (factor 50). Reported: the wall-clock seconds from the first step until the mean
accuracy over all 16 nodes (each node's newest evaluated model) first reaches the
target (0.92), and the final mean accuracy. Writes
benchmarks/results/async_stragglers.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from p2pfl.scenario import parse_scenario
from p2pfl.scenario.processes import run_processes

RESULTS = Path(__file__).resolve().parent / "results" / "async_stragglers.json"
NODES = 16
SLOW = [1, 5, 9, 13]
DEVICE = 10.0  # every node's training takes this many times as long as here
FACTOR = 5.0  # the slow ones' again
TARGET = 0.92


def scenario(seed: int, mode: str, slow: bool, rounds: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": f"stragglers-{mode}-{'slow' if slow else 'even'}-s{seed}",
        "nodes": NODES,
        "rounds": rounds,
        "seed": seed,
        "topology": {"kind": "kregular", "degree": 4},
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"name": "mlp", "hidden": 64},
        "training": {"epochs": 10, "lr": 0.005, "batch_size": 32},
        "protocol": {"mode": mode, "round_timeout": 60.0},
    }
    slowed = SLOW if slow else []
    doc["faults"] = [
        {"kind": "slow", "factor": DEVICE, "nodes": [i for i in range(NODES) if i not in slowed]}
    ]
    if slowed:
        doc["faults"].append({"kind": "slow", "factor": DEVICE * FACTOR, "nodes": slowed})
    return doc


def time_to(rows_by_node: dict[str, list[dict[str, Any]]], target: float) -> float | None:
    """Seconds from the first step's start until the mean over every node of its newest
    evaluated accuracy first reaches `target` (None if it never does)."""
    events = sorted(
        (row["time"], name, row["accuracy"])
        for name, rows in rows_by_node.items()
        for row in rows
        if "accuracy" in row
    )
    start = min(rows[0]["time"] - rows[0]["seconds"] for rows in rows_by_node.values() if rows)
    latest: dict[str, float] = {}
    for t, name, acc in events:
        latest[name] = acc
        if len(latest) == len(rows_by_node) and sum(latest.values()) / len(latest) >= target:
            return float(t - start)
    return None


def run(seed: int, mode: str, slow: bool, rounds: int) -> dict[str, Any]:
    s = parse_scenario(scenario(seed, mode, slow, rounds))
    with tempfile.TemporaryDirectory() as tmp:
        records, wall = run_processes(s, Path(tmp), timeout=900)
    rows = {name: rec["rounds"] for name, rec in records.items()}
    finals = [r[-1]["accuracy"] for r in rows.values()]
    return {
        "seed": seed,
        "mode": mode,
        "slow": slow,
        "time_to_target_s": time_to(rows, TARGET),
        "final_accuracy": sum(finals) / len(finals),
        "wall_s": wall,
        "steps_per_node": sum(len(r) for r in rows.values()) / len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    cells = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for slow in (False, True):
            for mode in ("sync", "async"):
                cell = run(seed, mode, slow, args.rounds)
                cells.append(cell)
                tt = cell["time_to_target_s"]
                print(
                    f"seed {seed} {'4 slow x5' if slow else 'none slow'} {mode:5}: "
                    f"to {TARGET} in {'never' if tt is None else f'{tt:.1f} s'}, "
                    f"final {cell['final_accuracy']:.3f}, wall {cell['wall_s']:.1f} s, "
                    f"{cell['steps_per_node']:.1f} steps/node",
                    flush=True,
                )
    summary = []
    for slow in (False, True):
        row: dict[str, Any] = {"slow": slow}
        for mode in ("sync", "async"):
            mine = [c for c in cells if c["slow"] == slow and c["mode"] == mode]
            times = [c["time_to_target_s"] for c in mine]
            row[f"{mode}_time_s"] = (
                None if None in times else sum(t for t in times if t is not None) / len(times)
            )
            row[f"{mode}_final"] = sum(c["final_accuracy"] for c in mine) / len(mine)
        if row["sync_time_s"] and row["async_time_s"]:
            row["speedup"] = row["sync_time_s"] / row["async_time_s"]
        summary.append(row)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"cells": cells, "summary": summary}, indent=2) + "\n")
    print(f"\n| slow nodes | sync: s to {TARGET} | async: s to {TARGET} | speedup "
          "| sync final | async final |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in summary:
        sync_t, async_t = row["sync_time_s"], row["async_time_s"]
        print(
            f"| {'4 of 16, x5' if row['slow'] else 'none'} "
            f"| {'never' if sync_t is None else f'{sync_t:.1f}'} "
            f"| {'never' if async_t is None else f'{async_t:.1f}'} "
            f"| {row.get('speedup', float('nan')):.2f}x "
            f"| {row['sync_final']:.3f} | {row['async_final']:.3f} |"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
