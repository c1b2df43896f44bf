"""Evidence for docs/optimizers.md: FedAvg against FedAvgM, FedAdam, FedYogi, FedAdagrad
(outer optimizers, `[training] outer`) and FedProx (`[training] prox_mu`).

Run: nice python benchmarks/optimizers_grid.py [--rounds 20] [--seeds 0,1,2,3,4]
     [--alpha 0.3] [--epochs 1] [--optimizers fedavg,fedavgm,...] [--jobs 2]
     (docs/optimizers.md has the runs)

8 nodes on a random 3-regular graph (the seed picks the graph and the split), digits
split Dirichlet(alpha), the MLP, `--epochs` local epochs per round at lr 0.05, the mean
rule, no attack: hetero_grid's scenario with fewer nodes and the optimizer as the
variable. An optimizer spec is a name from `OPTIMIZERS` or "name[:key=value;...]" with
`[training]` keys ("fedadam:outer_lr=0.03", "fedavgm:outer_beta1=0.5"). Each cell is one
`--in-process` scenario run (real Node code on the in-memory transport). Reported: the
nodes' mean final test accuracy (and the worst node's), averaged over seeds. Results go to
benchmarks/results/optimizers_grid.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cells import merge_results, run_cell_in_process, run_grid
from hetero_grid import scenario_doc  # a sibling script, not a package

RESULTS = Path(__file__).resolve().parent / "results" / "optimizers_grid.json"
NODES = 8
DEGREE = 3
# Name -> the [training] keys it sets (defaults of p2pfl.learning.outer otherwise).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"outer": "fedavgm"},
    "fedadam": {"outer": "fedadam"},
    "fedyogi": {"outer": "fedyogi"},
    "fedadagrad": {"outer": "fedadagrad"},
    "fedprox": {"prox_mu": 0.1},
}


def training_keys(spec: str) -> dict[str, Any]:
    """ "name[:key=value;...]" -> the [training] keys of that optimizer."""
    name, _, extra = spec.partition(":")
    keys = dict(OPTIMIZERS[name]) if name in OPTIMIZERS else {"outer": name}
    for item in filter(None, extra.split(";")):
        key, _, value = item.partition("=")
        keys[key] = value if key == "outer" else float(value)
    return keys


Cell = tuple[str, float, int, int, int]  # spec, alpha, epochs, rounds, seed


def run_cell(args: Cell) -> dict[str, Any]:
    spec, alpha, epochs, rounds, seed = args
    doc = scenario_doc("mean", 0.0, "none", rounds, seed)
    doc["name"] = re.sub(r"[^A-Za-z0-9._-]", "-", f"optimizers-{spec}-s{seed}")
    doc["nodes"] = NODES
    doc["topology"] = {"kind": "kregular", "degree": DEGREE}
    doc["data"]["alpha"] = alpha
    doc["training"]["epochs"] = epochs
    doc["aggregation"] = {"rule": "mean"}
    doc["training"].update(training_keys(spec))
    _, metrics, wall = run_cell_in_process(doc)
    final = metrics["summary"]["final"]
    return {
        "optimizer": spec,
        "alpha": alpha,
        "epochs": epochs,
        "rounds": rounds,
        "seed": seed,
        "accuracy_mean": final["accuracy_mean"],
        "accuracy_min": final["accuracy_min"],
        "wall_seconds": round(wall, 2),
    }


def _progress(r: dict[str, Any]) -> str:
    acc = r["accuracy_mean"]
    return (
        f"{r['optimizer']:28} seed {r['seed']} "
        f"acc={acc if acc is None else round(acc, 4)} {r['wall_seconds']}s"
    )


def _key(r: dict[str, Any]) -> tuple[str, float, int, int, int]:
    return (r["optimizer"], r["alpha"], r["epochs"], r["rounds"], r["seed"])


def markdown(results: list[dict[str, Any]], specs: list[str]) -> str:
    lines = [
        "| optimizer | mean accuracy (%) | worst node (%) | seeds |",
        "|---|---:|---:|---:|",
    ]
    for spec in specs:
        rows = [r for r in results if r["optimizer"] == spec and r["accuracy_mean"] is not None]
        if not rows:
            continue
        mean = 100 * sum(r["accuracy_mean"] for r in rows) / len(rows)
        worst = 100 * sum(r["accuracy_min"] for r in rows) / len(rows)
        lines.append(f"| {spec} | {mean:.1f} | {worst:.1f} | {len(rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated scenario seeds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    specs = [s for s in args.optimizers.split(",") if s]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    todo: list[Cell] = [
        (spec, args.alpha, args.epochs, args.rounds, seed) for seed in seeds for spec in specs
    ]
    started = time.monotonic()
    results = run_grid(run_cell, todo, args.jobs, _progress)
    done = {_key(r) for r in results}
    merged = merge_results(args.out, results, replaced=lambda r: _key(r) in done)
    shown = [
        r
        for r in merged
        if (r["alpha"], r["epochs"], r["rounds"]) == (args.alpha, args.epochs, args.rounds)
        and r["seed"] in seeds
    ]
    print(
        f"\n### optimizers ({NODES} nodes, {DEGREE}-regular, Dirichlet {args.alpha}, "
        f"{args.epochs} local epochs x {args.rounds} rounds, seeds {args.seeds}; final test "
        "accuracy averaged over seeds)\n"
    )
    print(markdown(shown, specs))
    print(f"\n{len(todo)} runs in {time.monotonic() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
