"""Distributed DP (secure groups adding shares of the noise) against local DP at the
same epsilon: the table of docs/privacy.md, "Distributed DP with secure aggregation".

Run: nice python benchmarks/privacy_distributed.py      (60 in-process runs, ~6 min)

`scenarios/quickstart.toml` (full mesh, digits, softmax, 10 rounds) with 8 and 32 nodes,
node-level DP at epsilon 1, 2, 4, 8 and 16 (delta 1e-5, clip 1.0, the noise derived from epsilon
and the rounds), each node noising its own update in full (local) or secure groups of
3 with each member adding a third of the noise variance (distributed); seeds 0-2.
Writes benchmarks/results/privacy_distributed.json and prints a markdown table.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from _cells import run_cell_in_process

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "privacy_distributed.json"
SEEDS = (0, 1, 2)
EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0)


def final_accuracy(nodes: int, epsilon: float, mode: str, seed: int) -> float:
    doc = tomllib.loads((ROOT / "scenarios" / "quickstart.toml").read_text())
    doc.update(nodes=nodes, seed=seed)
    doc["privacy"] = {"epsilon": epsilon, "delta": 1e-5, "clip": 1.0}
    if mode == "distributed":
        doc["secure_aggregation"] = {"enabled": True, "group_size": 3, "min_group": 3}
    _, metrics, _ = run_cell_in_process(doc)
    return float(metrics["summary"]["final"]["accuracy_mean"])


def main() -> None:
    rows: list[dict[str, Any]] = []
    for nodes in (8, 32):
        for epsilon in EPSILONS:
            for mode in ("local", "distributed"):
                accs = [final_accuracy(nodes, epsilon, mode, s) for s in SEEDS]
                rows.append({"nodes": nodes, "epsilon": epsilon, "mode": mode, "accuracy": accs})
                print(rows[-1], flush=True)
    RESULTS.write_text(json.dumps({"seeds": SEEDS, "results": rows}, indent=1) + "\n")
    print("\n| nodes | epsilon | local DP | distributed DP (groups of 3) |")
    print("|---:|---:|---:|---:|")
    for nodes in (8, 32):
        for epsilon in EPSILONS:
            cell = {
                r["mode"]: 100 * sum(r["accuracy"]) / len(r["accuracy"])
                for r in rows
                if r["nodes"] == nodes and r["epsilon"] == epsilon
            }
            print(f"| {nodes} | {epsilon:g} | {cell['local']:.1f} | {cell['distributed']:.1f} |")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
