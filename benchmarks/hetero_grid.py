"""Evidence for docs/robustness.md's "Heterogeneous sparse setting": the issue's case.

Run: nice python benchmarks/hetero_grid.py [--setup regular6|mesh25] [--rounds 20]
     [--jobs 2] [--rules ...] [--momenta 0,0.9] [--seeds 0] [--attacks ...]
     (docs/robustness.md has the runs)

--setup mesh25 is the bucketing paper's setting instead (Karimireddy, He and Jaggi,
ICLR 2022): 25 nodes, full mesh, Dirichlet(0.1), 5 attackers, every node declares
f = 5; columns: no attack, sign-flip x4, label-flip, IPM epsilon 0.1, ALIE. Its results
go to benchmarks/results/hetero_grid_mesh25.json. Rule-spec options epochs, lr and
batch_size set [training] instead ("centered_clipping@f5:bucket_size=2;batch_size=8").

The default setup, regular6:

20 nodes on a random 6-regular graph (seed 0), digits split Dirichlet(0.3), the MLP,
1 local epoch per round, 4 attackers (20%, chosen from the seed). Rows: robust rules,
each without and with worker momentum (`[training] worker_momentum`); columns: no
attack, sign-flip x10, Gaussian sigma 10, IPM epsilon 1, ALIE (z from n and f), and a
mix of the four (`[[attack]]` tables, one attacker each). Every node declares f = 2:
its own neighbourhood is 7 inputs, which outvote at most 3, and 4 attackers among 20
put 2 or fewer next to most nodes (the declared f is what each rule clips or trims
for, not the global count). A rule spec "name+nnm@f3" adds nearest-neighbour mixing
(`nnm = true`) and declares f = 3 instead; a suffix ":key=value;..." adds rule
options ("centered_clipping@f3:reject=3"). With several seeds the table averages
them (the seed picks the graph, the split and the attackers).

Each cell is one `--in-process` scenario run (real Node code on the in-memory
transport). Reported: the honest nodes' mean final test accuracy (and their minimum).
Results go to benchmarks/results/hetero_grid.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from _cells import merge_results, run_cell_in_process, run_grid

from p2pfl.scenario import topology

RESULTS = Path(__file__).resolve().parent / "results" / "hetero_grid.json"
# A "+nnm" suffix runs the rule after nearest-neighbour mixing (`nnm = true`); an
# "@fK" suffix declares f = K instead of F.
RULES = ("median", "centered_clipping", "self_centered_clipping", "clipped_gossip")
# (column name, [[attack]] tables)
ATTACKS_REGULAR6: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "sign_flip x10": [{"kind": "sign_flip", "fraction": 0.2, "scale": 10.0}],
    "gaussian s10": [{"kind": "gaussian", "fraction": 0.2, "sigma": 10.0}],
    "ipm e1": [{"kind": "ipm", "fraction": 0.2, "epsilon": 1.0}],
    "alie": [{"kind": "alie", "fraction": 0.2}],
    "mix": [
        {"kind": "sign_flip", "fraction": 0.05, "scale": 10.0},
        {"kind": "gaussian", "fraction": 0.05, "sigma": 10.0},
        {"kind": "ipm", "fraction": 0.05, "epsilon": 1.0},
        {"kind": "alie", "fraction": 0.05},
    ],
}
# The bucketing paper's setting (Karimireddy, He and Jaggi, ICLR 2022): 25 workers of
# which 5 Byzantine, every honest node sees every other (full mesh), Dirichlet(0.1).
ATTACKS_MESH25: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "sign_flip x4": [{"kind": "sign_flip", "fraction": 0.2, "scale": 4.0}],
    "label_flip": [{"kind": "label_flip", "fraction": 0.2}],
    "ipm e0.1": [{"kind": "ipm", "fraction": 0.2, "epsilon": 0.1}],
    "alie": [{"kind": "alie", "fraction": 0.2}],
}
# --setup name -> nodes, [topology], Dirichlet alpha, declared f, attack columns,
# results file.
SETUPS: dict[str, dict[str, Any]] = {
    "regular6": {
        "nodes": 20,
        "topology": {"kind": "kregular", "degree": 6},
        "alpha": 0.3,
        "f": 2,
        "attacks": ATTACKS_REGULAR6,
        "results": RESULTS,
    },
    "mesh25": {
        "nodes": 25,
        "topology": {"kind": "full"},
        "alpha": 0.1,
        "f": 5,
        "attacks": ATTACKS_MESH25,
        "results": RESULTS.with_name("hetero_grid_mesh25.json"),
    },
}
ATTACKS = ATTACKS_REGULAR6  # the default setup's columns
NODES = 20
F = 2
# Rule-spec options that go to [training] rather than [aggregation] (the local work per
# round: "centered_clipping@f5:bucket_size=2;batch_size=8;lr=0.02").
TRAINING_KEYS = ("epochs", "lr", "batch_size")


def parse_rule(spec: str, default_f: int = F) -> tuple[str, bool, int, dict[str, Any]]:
    """ "name[+nnm][@fK][:key=value;...]" -> (rule name, nearest-neighbour mixing,
    declared f, further [aggregation] options, values parsed as numbers when they are)."""
    spec, _, extra = spec.partition(":")
    body, _, f = spec.partition("@f")
    options: dict[str, Any] = {}
    for item in filter(None, extra.split(";")):
        key, _, value = item.partition("=")
        try:
            options[key] = int(value)
        except ValueError:
            options[key] = float(value)
    return body.removesuffix("+nnm"), body.endswith("+nnm"), int(f) if f else default_f, options


def scenario_doc(
    rule: str, momentum: float, attack: str, rounds: int, seed: int = 0, setup: str = "regular6"
) -> dict[str, Any]:
    s = SETUPS[setup]
    spec_name, mixing, f, options = parse_rule(rule, s["f"])
    training = {"epochs": 1, "lr": 0.05, "batch_size": 32, "worker_momentum": momentum}
    training.update({k: options.pop(k) for k in TRAINING_KEYS if k in options})
    prefix = "hetero" if setup == "regular6" else f"hetero-{setup}"
    doc: dict[str, Any] = {
        # (each cell runs in its own temporary folder: a cut name cannot collide)
        "name": re.sub(r"[^A-Za-z0-9._-]", "-", f"{prefix}-{rule}-m{momentum}-{attack}-s{seed}")[
            :64
        ],
        "nodes": s["nodes"],
        "rounds": rounds,
        "seed": seed,
        "topology": dict(s["topology"]),
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": s["alpha"]},
        "model": {"name": "mlp"},
        "training": training,
        "protocol": {"round_timeout": 30.0},
        "aggregation": {"rule": spec_name, "f": f, **options},
    }
    if mixing:  # nearest-neighbour mixing before the rule
        doc["aggregation"]["nnm"] = True
    if s["attacks"][attack]:
        doc["attack"] = [dict(t) for t in s["attacks"][attack]]
    return doc


Cell = tuple[str, float, str, int, int, str]


def run_cell(args: Cell) -> dict[str, Any]:
    rule, momentum, attack, rounds, seed, setup = args
    _, metrics, wall = run_cell_in_process(
        scenario_doc(rule, momentum, attack, rounds, seed, setup)
    )
    final = metrics["summary"]["final"]
    return {
        "rule": rule,
        "worker_momentum": momentum,
        "attack": attack,
        "rounds": rounds,
        "seed": seed,
        "f": parse_rule(rule, SETUPS[setup]["f"])[2],
        "honest_accuracy_mean": final["accuracy_mean"],
        "honest_accuracy_min": final["accuracy_min"],
        "malicious": metrics["summary"]["malicious_nodes"],
        "wall_seconds": round(wall, 2),
    }


def _key(r: dict[str, Any]) -> tuple[str, float, str, int, int]:
    return (r["rule"], r["worker_momentum"], r["attack"], r["rounds"], r.get("seed", 0))


def _progress(r: dict[str, Any]) -> str:
    acc = r["honest_accuracy_mean"]
    return (
        f"{r['rule']:24} m={r['worker_momentum']:g} {r['attack']:14} "
        f"acc={acc if acc is None else round(acc, 4)} {r['wall_seconds']}s"
    )


def breakdown(rule: str, attack: str, rounds: int, seed: int, setup: str) -> list[str]:
    """Honest nodes grouped by how many attackers they neighbour: the group's mean final
    accuracy clean and under `attack` (same graph, split and attackers), and its worst
    node under attack. Shows whether damage stays where the attackers are."""
    finals = {}
    for a in ("none", attack):
        scenario, metrics, _ = run_cell_in_process(scenario_doc(rule, 0.0, a, rounds, seed, setup))
        finals[a] = {k: v["rounds"][-1]["accuracy"] for k, v in metrics["nodes"].items()}
        malicious = {int(name[1:]) for name in metrics["summary"]["malicious_nodes"]}
    adj = topology.adjacency(scenario.nodes, scenario.edges())
    groups: dict[int, list[str]] = {}
    for i in range(scenario.nodes):
        if i not in malicious:
            groups.setdefault(sum(j in malicious for j in adj[i]), []).append(f"n{i}")
    lines = []
    for bad, names in sorted(groups.items()):
        clean = sum(finals["none"][k] for k in names) / len(names)
        hit = [finals[attack][k] for k in names]
        lines.append(
            f"| {seed} | {bad} | {len(names)} | {100 * clean:.1f} | "
            f"{100 * sum(hit) / len(hit):.1f} | {100 * min(hit):.1f} |"
        )
    return lines


def markdown(
    results: list[dict[str, Any]], rules: tuple[str, ...], columns: dict[str, Any] = ATTACKS
) -> str:
    """One row per rule x momentum: each cell the honest mean accuracy averaged over
    the seeds run (and the worst honest node over them); the last column is the largest
    drop of an attacked column below the row's own clean run."""
    attacks = [a for a in columns if any(r["attack"] == a for r in results)]
    seeds = sorted({r.get("seed", 0) for r in results})
    lines = [
        "| rule | worker momentum | "
        + " | ".join(a.replace("none", "no attack") for a in attacks)
        + " | worst drop |",
        "|---|---:|" + "---:|" * (len(attacks) + 1),
    ]
    momenta = sorted({r["worker_momentum"] for r in results})
    for rule in rules:
        for m in momenta:
            means: dict[str, float] = {}
            texts = []
            for a in attacks:
                hit = [
                    r
                    for r in results
                    if r["rule"] == rule
                    and r["worker_momentum"] == m
                    and r["attack"] == a
                    and r["honest_accuracy_mean"] is not None
                ]
                if len(hit) != len(seeds):
                    texts.append("")
                    continue
                means[a] = sum(r["honest_accuracy_mean"] for r in hit) / len(hit)
                low = min(r["honest_accuracy_min"] for r in hit)
                texts.append(f"{100 * means[a]:.1f} (min {100 * low:.1f})")
            if not means:
                continue
            drops = [means["none"] - v for a, v in means.items() if a != "none" and "none" in means]
            worst = f"{100 * max(drops):.1f}" if drops else ""
            lines.append(f"| {rule} | {m:g} | " + " | ".join(texts) + f" | {worst} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--momenta", default="0,0.9")
    parser.add_argument("--setup", choices=SETUPS, default="regular6")
    parser.add_argument("--attacks", help="comma-separated columns (default: the setup's)")
    parser.add_argument("--seeds", default="0", help="comma-separated scenario seeds")
    parser.add_argument("--out", type=Path, help="default: the setup's results file")
    parser.add_argument(
        "--breakdown",
        metavar="RULE:ATTACK",
        help="instead of the grid: per-node groups by attacking neighbours (no JSON)",
    )
    args = parser.parse_args()
    setup = SETUPS[args.setup]
    out: Path = args.out or setup["results"]
    if args.breakdown:
        rule, _, attack = args.breakdown.rpartition(":")  # rule specs may hold ":"
        print(f"### {rule} under {attack}, {args.rounds} rounds\n")
        print("| seed | attacking neighbours | honest nodes | clean | attacked | worst |")
        print("|---:|---:|---:|---:|---:|---:|")
        for seed in (int(x) for x in args.seeds.split(",") if x):
            print("\n".join(breakdown(rule, attack, args.rounds, seed, args.setup)), flush=True)
        return
    rules = tuple(r for r in args.rules.split(",") if r)
    momenta = [float(m) for m in args.momenta.split(",") if m]
    attacks = [a for a in (args.attacks or ",".join(setup["attacks"])).split(",") if a]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    todo: list[Cell] = [
        (rule, m, a, args.rounds, seed, args.setup)
        for seed in seeds
        for rule in rules
        for m in momenta
        for a in attacks
    ]
    started = time.monotonic()
    results = run_grid(run_cell, todo, args.jobs, _progress)
    done = {_key(r) for r in results}
    merged = merge_results(out, results, replaced=lambda r: _key(r) in done)
    print(
        f"\n### hetero ({args.rounds} rounds, seeds {args.seeds}; honest mean final "
        "accuracy, %, averaged over seeds; min = worst honest node)\n"
    )
    shown = [r for r in merged if r["rounds"] == args.rounds and r.get("seed", 0) in seeds]
    print(markdown(shown, tuple(dict.fromkeys((*RULES, *rules))), setup["attacks"]))
    print(f"\n{len(todo)} runs in {time.monotonic() - started:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
