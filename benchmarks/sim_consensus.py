"""Evidence for docs/compression.md: compressed gossip on a ring, with and without
the CHOCO consensus step (p2pfl.compression.consensus).

Run: nice python benchmarks/sim_consensus.py [--rounds 40] [--seeds 0 1 2] [--gammas 1.0 0.5]

Same simulation as benchmarks/sim_compression.py (the node's own learning,
compression, codec and aggregation code, no network or clock), on the scenario
`scenarios/ring.toml` describes: 8 nodes on a ring (each hears its two neighbours),
digits with Dirichlet(0.5) label skew, MLP(32), 1 epoch per round, lr 0.05, batch 32,
mean aggregation, here 40 rounds. Each round every node trains, encodes with its
UpdateEncoder (keyframes every 50 rounds, the 30x setting of the full-mesh table),
its two neighbours decode into its x_hat, then each node aggregates:

* plain: mean(own exact model, neighbours' x_hat)   (what the node does today)
* consensus gamma: own + gamma * (mean(own x_hat, neighbours' x_hat) - own x_hat)
  (CHOCO-SGD), and with keep < 1: own x_hat + keep * (own - own x_hat) + gamma * (...)

"bytes/update" is the whole wire message to one neighbour (header included),
averaged over rounds and nodes; accuracy is the test accuracy after aggregation,
mean and worst over nodes at the last round, averaged over seeds.
Writes benchmarks/results/sim_consensus.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sim_compression import codecs, train_round  # same directory: run as a script

from p2pfl.aggregation import mean
from p2pfl.compression.consensus import consensus_step
from p2pfl.learning import build_model, load_dataset, node_shard
from p2pfl.scenario.topology import adjacency, edges
from p2pfl.wire.codec import encode
from p2pfl.wire.messages import CompressedModelUpdate, ModelUpdate

RESULTS = Path(__file__).resolve().parent / "results" / "sim_consensus.json"
THIRTY_X = ["delta", "topk:0.03", "quantize:4", "zstd:3"]
ONE_PCT = ["delta", "topk:0.01", "quantize:8", "zstd:3"]


def simulate(
    stages: list[str],
    gamma: float | None,
    keep: float = 1.0,
    *,
    nodes: int,
    rounds: int,
    seed: int,
    topology: str,
    alpha: float,
    keyframe_every: int,
) -> dict[str, Any]:
    ds = load_dataset("digits", seed=seed)
    shards = [
        node_shard(ds, i, nodes, scheme="dirichlet", alpha=alpha, seed=seed) for i in range(nodes)
    ]
    models = [
        build_model("mlp", ds.n_features, ds.n_classes, seed=seed, hidden=32) for _ in range(nodes)
    ]
    evaluator = build_model("mlp", ds.n_features, ds.n_classes, seed=seed, hidden=32)
    params = [m.get_params() for m in models]
    dim = params[0].size
    neigh = adjacency(nodes, edges(topology, nodes, seed=seed))
    ids, seeds, pipeline, encoders, decoders = codecs(stages, nodes, seed, dim, keyframe_every)
    samples = np.array([len(s[1]) for s in shards], dtype=np.float64)
    curve_mean: list[float] = []
    curve_min: list[float] = []
    message_bytes: list[int] = []
    for r in range(rounds):
        trained = train_round(models, params, shards, seeds, r, 1, 0.05, 32)
        # held[j][i]: what node j holds for node i after this round (own: exact model)
        held: list[dict[int, np.ndarray]] = [{} for _ in range(nodes)]
        own_public = list(trained)
        for i in range(nodes):
            if pipeline is None:
                message_bytes.append(len(encode(ModelUpdate(ids[i], r, trained[i], 1))))
                for j in neigh[i]:
                    held[j][i] = trained[i]
                continue
            blob = encoders[i].encode(trained[i], r)
            x_hat = encoders[i].x_hat
            assert x_hat is not None
            own_public[i] = x_hat
            message_bytes.append(len(encode(CompressedModelUpdate(ids[i], r, blob, 1))))
            for j in neigh[i]:
                held[j][i] = decoders[j].decode(ids[i], r, blob)
        accs = []
        for j in range(nodes):
            order = sorted([j, *neigh[j]])
            w = samples[order]
            own_row = order.index(j)
            if gamma is None:
                rows = [trained[j] if i == j else held[j][i] for i in order]
                params[j] = mean(np.stack(rows), w, trained[j])
            else:
                rows = [own_public[j] if i == j else held[j][i] for i in order]
                params[j] = consensus_step(
                    mean, np.stack(rows), w, own_row, trained[j], gamma, keep
                )
            evaluator.set_params(params[j])
            accs.append(evaluator.evaluate(ds.x_test, ds.y_test)["accuracy"])
        curve_mean.append(float(np.mean(accs)))
        curve_min.append(float(np.min(accs)))
    per_update = float(np.mean(message_bytes))
    return {
        "bytes_per_update": per_update,
        "float32_bytes": 4 * dim,
        "final_mean": curve_mean[-1],
        "final_worst": curve_min[-1],
        "curve_mean": curve_mean,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--keyframe-every", type=int, default=50)
    ap.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2, 0.1])
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.6], help="with gamma 1")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cases: list[tuple[str, list[str], float | None, float]] = [("none (float32)", [], None, 1.0)]
    for label, stages in (("top-3%+int4+zstd", THIRTY_X), ("top-1%+int8+zstd", ONE_PCT)):
        cases.append((label, stages, None, 1.0))
        cases += [(label, stages, g, 1.0) for g in args.gammas]
        cases += [(label, stages, 1.0, k) for k in args.keeps]
    print(
        f"digits, MLP(32), {args.nodes} nodes {args.topology}, Dirichlet({args.alpha}), "
        f"{args.rounds} rounds, keyframes every {args.keyframe_every}, seeds {args.seeds}\n"
    )
    print("| pipeline | aggregation | bytes/update | ratio | final mean acc | worst node |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    start = time.perf_counter()
    for label, stages, gamma, keep in cases:
        runs = [
            simulate(
                stages,
                gamma,
                keep,
                nodes=args.nodes,
                rounds=args.rounds,
                seed=s,
                topology=args.topology,
                alpha=args.alpha,
                keyframe_every=args.keyframe_every,
            )
            for s in args.seeds
        ]
        per_update = float(np.mean([r["bytes_per_update"] for r in runs]))
        res = {
            "name": label,
            "stages": stages,
            "consensus_step": gamma,
            "keep": keep,
            "bytes_per_update": per_update,
            "ratio_vs_float32": runs[0]["float32_bytes"] / per_update,
            "final_accuracy_mean": float(np.mean([r["final_mean"] for r in runs])),
            "final_accuracy_worst_node": float(np.mean([r["final_worst"] for r in runs])),
            "final_mean_by_seed": [r["final_mean"] for r in runs],
            "final_worst_by_seed": [r["final_worst"] for r in runs],
            "accuracy_by_round": [
                round(float(a), 4) for a in np.mean([r["curve_mean"] for r in runs], axis=0)
            ],
        }
        rows.append(res)
        how = "plain" if gamma is None else f"consensus {gamma:g}"
        how += f", keep {keep:g}" if keep != 1.0 else ""
        print(
            f"| {label} | {how} | {per_update:.0f} | {res['ratio_vs_float32']:.1f}x | "
            f"{res['final_accuracy_mean']:.4f} | {res['final_accuracy_worst_node']:.4f} |",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc = {"settings": settings, "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
