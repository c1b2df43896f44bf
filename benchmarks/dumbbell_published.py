"""Side by side with ClippedGossip's published dumbbell (docs/robustness.md).

Run: nice python benchmarks/dumbbell_published.py [--rounds 300] [--jobs 2]

He, Karimireddy and Jaggi (2022) show on a dumbbell (two cliques joined by one edge,
each clique holding half of the labels, no attacker) that robust statistics (geometric
median, trimmed mean, UBAR) keep each clique at its half of the task while gossip
averaging and self-centred clipping let knowledge cross the bridge. Their artefact
(epfml/byzantine-robust-decentralized-optimizer, outputs/dumbbell/exp/acc.csv, MNIST,
870 SGD iterations) gives, per clique's averaged model on all ten digits: Gossip
69.0 / 75.6, SCClip 71.4 / 72.6, GM 50.7 / 47.2, TM 50.7 / 47.3, UBAR 50.7 / 47.2. Their
SCClip there is `scp1` in their dumbbell.py: a fixed radius tau = 1, not an adaptive one.

Here: `scenarios/dumbbell.toml` (digits, softmax, two 10-node cliques, f = 1) for
`--rounds` rounds (about 3 SGD steps per round), each rule one in-process run;
reported per clique, the mean final accuracy of its nodes. Results go to
benchmarks/results/dumbbell_published.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from p2pfl.scenario import parse_scenario
from p2pfl.scenario.inprocess import run_in_process
from p2pfl.scenario.report import build_metrics

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "dumbbell_published.json"
# (row name, [aggregation] table)
RULES: list[tuple[str, dict[str, Any]]] = [
    ("mean (gossip averaging)", {"rule": "mean", "f": 0}),
    ("geometric_median", {"rule": "geometric_median", "f": 1}),
    ("trimmed_mean", {"rule": "trimmed_mean", "f": 1}),
    ("self_centered_clipping, adaptive tau", {"rule": "self_centered_clipping", "f": 1}),
    ("clipped_gossip, adaptive tau", {"rule": "clipped_gossip", "f": 1}),
    ("self_centered_clipping, tau = 1", {"rule": "self_centered_clipping", "f": 1, "tau": 1.0}),
    ("self_centered_clipping, tau = 3", {"rule": "self_centered_clipping", "f": 1, "tau": 3.0}),
]
PUBLISHED = {  # clique 1 / clique 2 after 870 iterations, from their acc.csv
    "mean (gossip averaging)": "69.0 / 75.6",
    "geometric_median": "50.7 / 47.2",
    "trimmed_mean": "50.7 / 47.3",
    "self_centered_clipping, tau = 1": "71.4 / 72.6 (their `scp1`)",
}


def run_cell(args: tuple[str, dict[str, Any], int]) -> dict[str, Any]:
    name, aggregation, rounds = args
    doc = tomllib.loads((ROOT / "scenarios" / "dumbbell.toml").read_text())
    doc["rounds"] = rounds
    doc["aggregation"] = dict(aggregation)
    scenario = parse_scenario(doc)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        records, _ = run_in_process(scenario, Path(tmp))
    wall = time.monotonic() - started
    nodes = build_metrics(scenario, records, wall_seconds=wall, mode="in-process")["nodes"]
    final = {k: v["rounds"][-1]["accuracy"] for k, v in nodes.items()}
    half = scenario.nodes // 2
    cliques = [
        [final[f"n{i}"] for i in range(half)],
        [final[f"n{i}"] for i in range(half, scenario.nodes)],
    ]
    return {
        "rule": name,
        "aggregation": aggregation,
        "rounds": rounds,
        "clique_accuracy": [sum(c) / len(c) for c in cliques],
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    todo = [(name, agg, args.rounds) for name, agg in RULES]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run_cell, todo)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=1) + "\n")
    print(f"### dumbbell, {args.rounds} rounds (clique 1 / clique 2, %)\n")
    print("| rule | p2pfl | published (He et al. 2022 artefact, 870 iterations) |")
    print("|---|---:|---:|")
    for r in results:
        a, b = (100 * x for x in r["clique_accuracy"])
        print(f"| {r['rule']} | {a:.1f} / {b:.1f} | {PUBLISHED.get(r['rule'], '')} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
