"""Personal (Ditto) against shared accuracy on each node's own test split: the table of
docs/heterogeneity.md, "Personalization".

Run: nice python benchmarks/personalization.py [--seeds 0,1,2] [--lambdas 0.1,1.0]

16 nodes on a random 4-regular graph, digits split Dirichlet(0.1) (the seed picks graph
and split), the MLP, 1 local epoch per round, 20 rounds, `personalize = "ditto"`; each
node holds out 20% of its shard as its own test split. Reported per lambda, averaged
over nodes and seeds: the shared model on the federation's test set (`accuracy`), the
shared model on each node's own split (`local_accuracy`) and the personal model on it
(`personal_accuracy`). Writes benchmarks/results/personalization.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _cells import run_cell_in_process

RESULTS = Path(__file__).resolve().parent / "results" / "personalization.json"
KEYS = ("accuracy", "local_accuracy", "personal_accuracy")


def run(seed: int, lam: float) -> dict[str, float]:
    doc: dict[str, Any] = {
        "name": f"personal-s{seed}",
        "nodes": 16,
        "rounds": 20,
        "seed": seed,
        "topology": {"kind": "kregular", "degree": 4},
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.1},
        "model": {"name": "mlp"},
        "training": {"epochs": 1, "lr": 0.05, "batch_size": 32, "personalize": "ditto",
                     "personal_lambda": lam},
        "protocol": {"round_timeout": 30.0},
    }  # fmt: skip
    nodes = run_cell_in_process(doc)[1]["nodes"]
    finals = [rec["rounds"][-1]["metrics"] for rec in nodes.values()]
    return {k: sum(f[k] for f in finals) / len(finals) for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lambdas", default="0.1,1.0")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for lam in (float(x) for x in args.lambdas.split(",")):
        per_seed = {s: run(s, lam) for s in seeds}
        for s, r in per_seed.items():
            print(f"lambda {lam:g} seed {s}: " + " ".join(f"{k} {v:.4f}" for k, v in r.items()))
        mean = {k: sum(r[k] for r in per_seed.values()) / len(seeds) for k in KEYS}
        rows.append({"lambda": lam, "seeds": per_seed, "mean": mean})
    RESULTS.write_text(json.dumps({"results": rows}, indent=1) + "\n")
    print("\n| lambda | shared, federation test | shared, own split | personal, own split | gain |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["mean"]
        gain = 100 * (m["personal_accuracy"] - m["local_accuracy"])
        print(
            f"| {r['lambda']:g} | {100 * m['accuracy']:.1f} | {100 * m['local_accuracy']:.1f} | "
            f"{100 * m['personal_accuracy']:.1f} | {gain:+.1f} |"
        )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
