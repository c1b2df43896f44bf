"""Evidence for docs/compression.md from real nodes: `p2pfl scenario run --in-process`.

Run: python benchmarks/scenario_compression.py [--rounds 40] [--seeds 0 1 2]

The same rows and settings as benchmarks/sim_compression.py (digits, MLP, 8 nodes on a
full mesh, 1 epoch per round, lr 0.05, batch 32), but every run starts real p2pfl
nodes (in one process, on the in-memory transport) from a scenario file with a
`[compression] pipeline = [...]` table, and the numbers come from the nodes' own
metrics: `update_wire_bytes` (the model message each node sent per round, keyframes
included), `bytes_sent` (everything a node sent: updates to all 7 peers, framing,
heartbeats, hellos), and the per-round mean test accuracy across nodes. Accuracy is
averaged over the seeds. The nodes use the encoder's default keyframe interval (10);
`--keyframe-every N` runs the same CLI with UpdateEncoder's default changed to N in the
child process, because NodeConfig has no keyframe field yet (an experiment knob only).
Prints a markdown table and writes benchmarks/results/scenario_compression.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _cells import run_cli_scenario, update_bytes, write_rows
from sim_compression import ROWS, TARGET

RESULTS = Path(__file__).resolve().parent / "results" / "scenario_compression.json"

TEMPLATE = """\
name = "compression-{tag}"
nodes = {nodes}
rounds = {rounds}
seed = {seed}

[topology]
kind = "full"

[data]
dataset = "digits"
partition = "iid"

[model]
name = "mlp"
hidden = 32

[training]
epochs = 1
lr = 0.05
batch_size = 32

[protocol]
round_timeout = 60.0

[compression]
pipeline = {pipeline}
"""


def run_one(
    tag: str,
    stages: list[str],
    *,
    nodes: int,
    rounds: int,
    seed: int,
    keyframe_every: int,
    work: Path,
) -> dict[str, Any]:
    text = TEMPLATE.format(
        tag=tag, nodes=nodes, rounds=rounds, seed=seed, pipeline=json.dumps(stages)
    )
    cli = (
        "import sys\n"
        "from p2pfl.compression.encoder import UpdateEncoder\n"
        f"UpdateEncoder.__init__.__kwdefaults__['keyframe_every'] = {keyframe_every}\n"
        "from p2pfl.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    metrics = run_cli_scenario([sys.executable, "-c", cli], text, tag, work)
    curve = [r["accuracy_mean"] for r in metrics["summary"]["per_round"]]
    update, float32_bytes = update_bytes(metrics)
    sent = [n["rounds"][-1]["bytes_sent"] / len(n["rounds"]) for n in metrics["nodes"].values()]
    return {
        "accuracy_by_round": curve,
        "bytes_per_update": float(np.mean(update)),
        "bytes_sent_per_round_per_node": float(np.mean(sent)),
        "float32_bytes": float32_bytes,
        "wall_seconds": metrics["summary"]["wall_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keyframe-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    print(
        f"digits, MLP(hidden=32), {args.nodes} real nodes in-process, full mesh, "
        f"{args.rounds} rounds, seeds {args.seeds}, keyframe every {args.keyframe_every} rounds\n"
    )
    print("| pipeline | bytes/update | ratio | sent/round/node | final acc | rounds to 0.90 |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="p2pfl-compression-") as tmp:
        for index, (name, stages) in enumerate(ROWS):
            runs = [
                run_one(
                    f"row{index}-seed{s}",
                    stages,
                    nodes=args.nodes,
                    rounds=args.rounds,
                    seed=s,
                    keyframe_every=args.keyframe_every,
                    work=Path(tmp),
                )
                for s in args.seeds
            ]
            curve = np.mean([r["accuracy_by_round"] for r in runs], axis=0)
            reached = next((i + 1 for i, a in enumerate(curve) if a >= TARGET), None)
            per_update = float(np.mean([r["bytes_per_update"] for r in runs]))
            row = {
                "name": name,
                "stages": stages,
                "bytes_per_update": per_update,
                "ratio_vs_float32": runs[0]["float32_bytes"] / per_update,
                "bytes_sent_per_round_per_node": float(
                    np.mean([r["bytes_sent_per_round_per_node"] for r in runs])
                ),
                "final_accuracy_mean": float(curve[-1]),
                "final_accuracy_by_seed": [r["accuracy_by_round"][-1] for r in runs],
                "rounds_to_target": reached,
                "accuracy_by_round": [round(float(a), 4) for a in curve],
                "wall_seconds": [r["wall_seconds"] for r in runs],
            }
            rows.append(row)
            print(
                f"| {name} `{json.dumps(stages)}` | {per_update:.0f} | "
                f"{row['ratio_vs_float32']:.1f}x | {row['bytes_sent_per_round_per_node']:.0f} | "
                f"{row['final_accuracy_mean']:.4f} | {reached if reached else '-'} |",
                flush=True,
            )
    write_rows(args.out, args, start, rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
