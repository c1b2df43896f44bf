"""Evidence for docs/robustness.md: honest accuracy for every rule x attack, in-process.

Run: python benchmarks/robustness_grid.py [--rounds 20] [--jobs 2] [--only iid,ring]

Grids (20 nodes, full mesh, digits, softmax, 1 local epoch per round, seed 0):
- `iid`, `dirichlet`: rows = rules (mean, median, trimmed mean, Krum, geometric median,
  centred clipping, self-centred clipping, ClippedGossip, centred clipping with the
  far-outlier cut `reject = 3`), each without and with bucketing s=2;
  columns = no attack, sign-flip, Gaussian, label-flip, IPM, ALIE with 20% attackers
  (4 nodes chosen from the seed) and every node declaring f = 4.
- `strong`: Dirichlet(0.5), the attacks that barely registered at their defaults with
  stronger parameters (Gaussian sigma=10, IPM epsilon=1, ALIE z=1.5).
- `ring` (Dirichlet(0.5)) and `dumbbell` (two 10-cliques joined by one edge; clique A
  holds only digits 0-4, clique B only 5-9): no attacker, f = 1, to show what each
  rule does to a sparse honest neighbourhood.

Each cell is one `--in-process` scenario run (the same Node code as real processes,
on the in-memory transport). Reported: the honest nodes' mean final test accuracy
(and their minimum), plus how many aggregations fell back to the median. Results go
to benchmarks/results/robustness_grid.json and a markdown table on stdout.

The dumbbell grid is `scenarios/dumbbell.toml` with the rule varied: its per-clique
label split is the scenario partition `clusters`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _cells import chosen, counting_fallbacks, merge_results, run_cell_in_process, run_grid

RESULTS = Path(__file__).resolve().parent / "results" / "robustness_grid.json"
RULES = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "geometric_median",
    "centered_clipping",
    "self_centered_clipping",
    "clipped_gossip",
    # the far-outlier cut, as docs/robustness.md recommends it ("rule:key=value;...")
    "centered_clipping:reject=3",
)
ATTACKS = ("none", "sign_flip", "gaussian", "label_flip", "ipm", "alie")
# Stronger settings of the attacks that did little at their defaults ("kind:key=value").
STRONG = ("gaussian:sigma=10", "ipm:epsilon=1", "alie:z=1.5")
GRIDS = ("iid", "dirichlet", "strong", "ring", "dumbbell")
NODES = 20


def scenario_doc(grid: str, rule: str, bucketed: bool, attack: str, rounds: int) -> dict[str, Any]:
    # "strong" runs on Dirichlet(0.5); the dumbbell's cliques (nodes 0-9, 10-19) hold
    # digits 0-4 and 5-9: the "clusters" partition cuts nodes and labels into 2 blocks.
    partition = {"iid": "iid", "dumbbell": "clusters"}.get(grid, "dirichlet")
    name, _, extra = rule.partition(":")
    options = {k: float(v) for k, _, v in (o.partition("=") for o in extra.split(";") if o)}
    doc: dict[str, Any] = {
        "name": f"{grid}-{rule}{'-b2' if bucketed else ''}-{attack}".replace(":", "-")
        .replace("=", "")
        .replace(";", "-"),
        "nodes": NODES,
        "rounds": rounds,
        "seed": 0,
        "data": {"dataset": "digits", "partition": partition, "alpha": 0.5, "clusters": 2},
        "model": {"name": "softmax"},
        "training": {"epochs": 1, "lr": 0.05, "batch_size": 32},
        "protocol": {"round_timeout": 30.0},
        "aggregation": {"rule": name, "f": 1 if grid in ("ring", "dumbbell") else 4, **options},
    }
    if bucketed:
        doc["aggregation"]["bucket_size"] = 2
    if attack != "none":
        kind, _, option = attack.partition(":")
        doc["attack"] = {"kind": kind, "fraction": 0.2}
        if option:
            key, value = option.split("=")
            doc["attack"][key] = float(value)
    if grid == "ring":
        doc["topology"] = {"kind": "ring"}
    elif grid == "dumbbell":
        doc["topology"] = {"kind": "cliques", "cliques": 2}
    return doc


def run_cell(args: tuple[str, str, bool, str, int]) -> dict[str, Any]:
    grid, rule, bucketed, attack, rounds = args
    with counting_fallbacks() as fallbacks:  # the rules' first-time warnings only
        _, metrics, wall = run_cell_in_process(scenario_doc(grid, rule, bucketed, attack, rounds))
    final = metrics["summary"]["final"]
    return {
        "grid": grid,
        "rule": rule,
        "bucketing": bucketed,
        "attack": attack,
        "rounds": rounds,
        "honest_accuracy_mean": final["accuracy_mean"],
        "honest_accuracy_min": final["accuracy_min"],
        "malicious": metrics["summary"]["malicious_nodes"],
        # Nodes (x input counts) whose rule fell back to the median at least once.
        "fallback_nodes": fallbacks.count,
        "wall_seconds": round(wall, 2),
    }


def cells(grids: list[str], rounds: int) -> list[tuple[str, str, bool, str, int]]:
    out = []
    for grid in grids:
        attacks = {"iid": ATTACKS, "dirichlet": ATTACKS, "strong": STRONG}.get(grid, ("none",))
        for rule in RULES:
            for bucketed in (False, True):
                for attack in attacks:
                    out.append((grid, rule, bucketed, attack, rounds))
    return out


def markdown(results: list[dict[str, Any]], grid: str) -> str:
    rows = [r for r in results if r["grid"] == grid]
    attacks = [a for a in (*ATTACKS, *STRONG) if any(r["attack"] == a for r in rows)]
    lines = [
        "| rule | " + " | ".join(a.replace("none", "no attack") for a in attacks) + " |",
        "|---|" + "---:|" * len(attacks),
    ]
    for rule in RULES:
        for bucketed in (False, True):
            cells_ = []
            for a in attacks:
                hit = [
                    r
                    for r in rows
                    if r["rule"] == rule and r["bucketing"] == bucketed and r["attack"] == a
                ]
                if not hit:
                    cells_.append("")
                    continue
                r = hit[0]
                acc = r["honest_accuracy_mean"]
                text = "-" if acc is None else f"{100 * acc:.1f}"
                if grid in ("ring", "dumbbell") and r["honest_accuracy_min"] is not None:
                    text += f" (min {100 * r['honest_accuracy_min']:.1f})"
                if r["fallback_nodes"]:
                    text += " *"
                cells_.append(text)
            name = rule + (" + bucketing(2)" if bucketed else "")
            lines.append(f"| {name} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=",".join(GRIDS), help="comma-separated grids")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    grids = chosen(parser, args.only, GRIDS, "grids")
    todo = cells(grids, args.rounds)
    started = time.monotonic()
    results = run_grid(run_cell, todo, args.jobs, _progress)
    merged = merge_results(
        args.out,
        sorted(results, key=lambda r: todo.index(_key(r))),
        replaced=lambda r: r["grid"] in grids and r["rounds"] == args.rounds,
    )
    for grid in grids:
        print(f"\n### {grid} ({args.rounds} rounds; honest nodes' mean final accuracy, %)\n")
        print(markdown(merged, grid))
    print(f"\n{len(todo)} runs in {time.monotonic() - started:.0f} s; wrote {args.out}")


def _progress(r: dict[str, Any]) -> str:
    acc = r["honest_accuracy_mean"]
    return (
        f"{r['grid']:9} {r['rule']:24} b={int(r['bucketing'])} "
        f"{r['attack']:10} acc={acc if acc is None else round(acc, 4)} "
        f"fallbacks={r['fallback_nodes']} {r['wall_seconds']}s"
    )


def _key(r: dict[str, Any]) -> tuple[str, str, bool, str, int]:
    return (r["grid"], r["rule"], r["bucketing"], r["attack"], r["rounds"])


if __name__ == "__main__":
    main()
