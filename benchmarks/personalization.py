"""Personal (Ditto) against shared accuracy on each node's own test split: the table of
docs/heterogeneity.md, "Personalization".

Run: nice python benchmarks/personalization.py [--seeds 0,1,2] [--lambdas 0.1]
         [--personal-epochs 10] [--personalize ditto] [--model mlp] [--jobs 2]
(the defaults are the setting docs/heterogeneity.md recommends; its sweeps list more)

16 nodes on a random 4-regular graph, digits split Dirichlet(0.1) (the seed picks graph
and split), the MLP, 1 local epoch per round for the shared model, 20 rounds,
`personalize = "ditto"` with `personal_epochs` local epochs for the personal one; each
node holds out 20% of its shard as its own test split; `--personalize head` makes only
the output layer personal (FedPer/FedRep style); `--model softmax` runs the linear model
instead (a check that the finding is not the MLP's). Reported per (personalize, lambda,
personal epochs), averaged over nodes and seeds: the shared model on the federation's
test set (`accuracy`), the shared model on each node's own split (`local_accuracy`) and the
personal model on it (`personal_accuracy`). The shared model does not depend on the
personal settings (the personal model never leaves the node), so the gain is the
personal model's alone. Updates benchmarks/results/personalization.json (rows of other
settings already there are kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _cells import merge_results, run_cell_in_process, run_grid

RESULTS = Path(__file__).resolve().parent / "results" / "personalization.json"
KEYS = ("accuracy", "local_accuracy", "personal_accuracy")
EPOCHS = 1  # the shared model's local epochs per round

Cell = tuple[int, float, int, str, str]  # seed, lambda, personal epochs, personalize, model


def run(cell: Cell) -> tuple[Cell, dict[str, float]]:
    seed, lam, personal_epochs, mode, model = cell
    doc: dict[str, Any] = {
        "name": f"personal-s{seed}",
        "nodes": 16,
        "rounds": 20,
        "seed": seed,
        "topology": {"kind": "kregular", "degree": 4},
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.1},
        "model": {"name": model},
        "training": {"epochs": EPOCHS, "lr": 0.05, "batch_size": 32, "personalize": mode,
                     "personal_lambda": lam, "personal_epochs": personal_epochs},
        "protocol": {"round_timeout": 30.0},
    }  # fmt: skip
    nodes = run_cell_in_process(doc)[1]["nodes"]
    finals = [rec["rounds"][-1]["metrics"] for rec in nodes.values()]
    return cell, {k: sum(f[k] for f in finals) / len(finals) for k in KEYS}


def _setting(row: dict[str, Any]) -> tuple[float, int, str, str]:
    # Rows written before personal_epochs existed trained v for `epochs` (1) epochs.
    pe = int(row.get("personal_epochs", EPOCHS))
    mode, model = str(row.get("personalize", "ditto")), str(row.get("model", "mlp"))
    return float(row["lambda"]), pe, mode, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lambdas", default="0.1")
    parser.add_argument("--personal-epochs", default="10", help="comma-separated, e.g. 1,3,5")
    parser.add_argument("--personalize", default="ditto", help="ditto, head or both")
    parser.add_argument("--model", default="mlp", help="mlp (the table) or softmax")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [
        (float(lam), int(pe), mode, args.model)
        for mode in args.personalize.split(",")
        for lam in args.lambdas.split(",")
        for pe in args.personal_epochs.split(",")
    ]
    todo = [(s, *setting) for setting in settings for s in seeds]

    def describe(r: tuple[Cell, dict[str, float]]) -> str:
        (s, lam, pe, mode, model), m = r
        gain = 100 * (m["personal_accuracy"] - m["local_accuracy"])
        return (
            f"{model} {mode} lambda {lam:g} personal_epochs {pe} seed {s}: {gain:+.1f} "
            + " ".join(f"{k} {v:.4f}" for k, v in m.items())
        )

    done = dict(run_grid(run, todo, args.jobs, describe))
    rows = []
    for lam, pe, mode, model in settings:
        per_seed = {s: done[(s, lam, pe, mode, model)] for s in seeds}
        mean = {k: sum(r[k] for r in per_seed.values()) / len(seeds) for k in KEYS}
        rows.append(
            {"model": model, "personalize": mode, "lambda": lam, "personal_epochs": pe,
             "seeds": per_seed, "mean": mean}
        )  # fmt: skip
    merged = merge_results(RESULTS, rows, replaced=lambda r: _setting(r) in settings)
    print(
        "\n| model | personalize | lambda | personal epochs | shared, federation test "
        "| shared, own split | personal, own split | gain | gain per seed |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in sorted(merged, key=lambda r: (_setting(r)[3], _setting(r)[2], *_setting(r)[:2])):
        m = r["mean"]
        gain = 100 * (m["personal_accuracy"] - m["local_accuracy"])
        per = ", ".join(
            f"{100 * (v['personal_accuracy'] - v['local_accuracy']):+.1f}"
            for _, v in sorted(r["seeds"].items())
        )
        lam, pe, mode, model = _setting(r)
        print(
            f"| {model} | {mode} | {lam:g} | {pe} | {100 * m['accuracy']:.1f} | "
            f"{100 * m['local_accuracy']:.1f} | {100 * m['personal_accuracy']:.1f} | "
            f"{gain:+.1f} | {per} |"
        )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
