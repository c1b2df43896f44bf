"""Evidence for docs/compression.md (issue 15): the consensus step on real nodes.

Run: nice python benchmarks/scenario_consensus.py [--rounds 40] [--seeds 0 1 2] [--jobs 2]

Every run is `p2pfl scenario run --in-process` on `scenarios/ring.toml`'s setting with
40 rounds: digits, MLP(32), 8 nodes on a ring (two neighbours each), Dirichlet(0.5)
label skew, 1 epoch per round, lr 0.05, batch 32, mean aggregation; compressed rows use
`[compression] pipeline = [...]`, `keyframe_every = 50` (the 30x row's setting) and
`consensus` / `consensus_keep` for the consensus step. Numbers come from the nodes'
own metrics: `update_wire_bytes` (the model message each node sent per round) and the
test accuracy after aggregation at the last round, mean and worst node, averaged over
the seeds (every row runs every seed: no per-seed tuning).
Prints a markdown table and writes benchmarks/results/scenario_consensus.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _cells import run_cli_scenario, update_bytes, write_rows

RESULTS = Path(__file__).resolve().parent / "results" / "scenario_consensus.json"
THIRTY_X = ["delta", "topk:0.03", "quantize:4", "zstd:3"]

# (name, pipeline, gamma, keep): gamma 0 = the node's plain aggregation.
ROWS: list[tuple[str, list[str], float, float]] = [
    ("none (float32)", [], 0.0, 1.0),
    ("30x, plain (today)", THIRTY_X, 0.0, 1.0),
    ("30x, consensus gamma 1, keep 1 (CHOCO)", THIRTY_X, 1.0, 1.0),
    ("30x, consensus gamma 0.5, keep 1 (CHOCO)", THIRTY_X, 0.5, 1.0),
    ("30x, consensus gamma 0.2, keep 1 (CHOCO)", THIRTY_X, 0.2, 1.0),
    ("30x, consensus gamma 1, keep 0.5", THIRTY_X, 1.0, 0.5),
    ("30x, consensus gamma 1, keep 0.6", THIRTY_X, 1.0, 0.6),
    ("30x, consensus gamma 1, keep 0.7", THIRTY_X, 1.0, 0.7),
    ("30x, consensus gamma 0.8, keep 0.6", THIRTY_X, 0.8, 0.6),
    # Fewer than 30x: where the consensus step gets within a point.
    ("top-4%+int4, plain", ["delta", "topk:0.04", "quantize:4", "zstd:3"], 0.0, 1.0),
    ("top-4%+int4, gamma 1, keep 0.6", ["delta", "topk:0.04", "quantize:4", "zstd:3"], 1.0, 0.6),
    ("top-5%+int4, plain", ["delta", "topk:0.05", "quantize:4", "zstd:3"], 0.0, 1.0),
    ("top-5%+int4, gamma 1, keep 0.6", ["delta", "topk:0.05", "quantize:4", "zstd:3"], 1.0, 0.6),
    # Other pipelines near 30x, with the best step found above.
    ("top-3%+int4s, gamma 1, keep 0.6", ["delta", "topk:0.03", "quantize:4s", "zstd:3"], 1.0, 0.6),
    ("top-2.5%+int4, gamma 1, keep 0.6", ["delta", "topk:0.025", "quantize:4", "zstd:3"], 1.0, 0.6),
    ("top-2%+int8, gamma 1, keep 0.6", ["delta", "topk:0.02", "quantize:8", "zstd:3"], 1.0, 0.6),
    # With the leaner wire format (Elias-Fano indices, flags header) top-6% fits in 30x.
    ("top-6%+int4, plain", ["delta", "topk:0.06", "quantize:4", "zstd:3"], 0.0, 1.0),
    ("top-6%+int4, gamma 1, keep 0.6", ["delta", "topk:0.06", "quantize:4", "zstd:3"], 1.0, 0.6),
]

TEMPLATE = """\
name = "consensus-{tag}"
nodes = {nodes}
rounds = {rounds}
seed = {seed}

[topology]
kind = "{topology}"

[data]
dataset = "digits"
partition = "dirichlet"
alpha = {alpha}

[model]
name = "mlp"
hidden = 32

[training]
epochs = 1
lr = 0.05
batch_size = 32

[protocol]
neighbours = "all"
quorum = 1.0
round_timeout = 60.0
"""

COMPRESSION = """
[compression]
pipeline = {pipeline}
keyframe_every = {keyframe_every}
consensus = {gamma}
consensus_keep = {keep}
"""


def run_one(
    tag: str, stages: list[str], gamma: float, keep: float, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    work: Path = args.work
    text = TEMPLATE.format(
        tag=tag,
        nodes=args.nodes,
        rounds=args.rounds,
        seed=seed,
        topology=args.topology,
        alpha=args.alpha,
    )
    if stages:
        text += COMPRESSION.format(
            pipeline=json.dumps(stages), keyframe_every=args.keyframe_every, gamma=gamma, keep=keep
        )
    metrics = run_cli_scenario([sys.executable, "-m", "p2pfl"], text, tag, work)
    update, float32_bytes = update_bytes(metrics)
    last = [node["rounds"][-1]["accuracy"] for node in metrics["nodes"].values()]
    return {
        "seed": seed,
        "final_mean": float(np.mean(last)),
        "final_worst": float(np.min(last)),
        "bytes_per_update": float(np.mean(update)),
        "float32_bytes": float32_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--keyframe-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="*", help="indices into ROWS (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    chosen = [ROWS[i] for i in args.rows] if args.rows else ROWS
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="p2pfl-consensus-") as tmp:
        args.work = Path(tmp)
        jobs = [
            (f"row{i}-seed{s}", stages, gamma, keep, s)
            for i, (_, stages, gamma, keep) in enumerate(chosen)
            for s in args.seeds
        ]
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(lambda j: run_one(*j, args), jobs))
    del args.work
    results: list[dict[str, Any]] = []
    base = None
    print("| compression | bytes/update | ratio | final mean acc | vs float32 | worst node |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (name, stages, gamma, keep) in enumerate(chosen):
        runs = done[i * len(args.seeds) : (i + 1) * len(args.seeds)]
        mean_acc = float(np.mean([r["final_mean"] for r in runs]))
        per_update = float(np.mean([r["bytes_per_update"] for r in runs]))
        base = mean_acc if base is None and not stages else base
        row = {
            "name": name,
            "stages": stages,
            "consensus": gamma,
            "consensus_keep": keep,
            "bytes_per_update": per_update,
            "ratio_vs_float32": runs[0]["float32_bytes"] / per_update,
            "final_accuracy_mean": mean_acc,
            "final_accuracy_worst": float(np.mean([r["final_worst"] for r in runs])),
            "by_seed": runs,
        }
        results.append(row)
        gap = f"{100 * (mean_acc - base):+.1f}" if base is not None else "-"
        print(
            f"| {name} | {per_update:.0f} | {row['ratio_vs_float32']:.1f}x | {mean_acc:.4f} | "
            f"{gap} | {row['final_accuracy_worst']:.4f} |",
            flush=True,
        )
    write_rows(args.out, args, start, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
