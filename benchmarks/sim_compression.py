"""Evidence for docs/compression.md: a federation simulated in one process, pure numpy.

Run: python benchmarks/sim_compression.py [--rounds 40] [--seeds 0 1 2] [--keyframe-every 10 50]

What is simulated is exactly what the node does each round, with the same code
(p2pfl.learning, p2pfl.aggregation, p2pfl.compression, the wire codec), minus the
network and the clock: every node trains its own model from its current parameters
(same data shard, model seed and per-round training seed as `p2pfl scenario run`
gives it), encodes the result with its UpdateEncoder, every other node decodes it
into that sender's x_hat, and each node aggregates its own trained model with the
x_hat copies of the others (sample-weighted mean, canonical order) and evaluates the
result on the shared test set. Full mesh, quorum 1, no losses or timeouts.

"bytes/update" is the size of the whole wire message one node sends to one neighbour
for one round (msgpack payload: header, blob and all), averaged over rounds and
nodes, keyframes included; a node on a full mesh of 8 sends it to 7 peers.
Prints a markdown table and writes benchmarks/results/sim_compression.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.aggregation import mean
from p2pfl.compression import Pipeline, UpdateDecoder, UpdateEncoder, parse_pipeline
from p2pfl.learning import build_model, load_dataset, node_shard
from p2pfl.scenario.schema import node_seed
from p2pfl.wire.codec import encode
from p2pfl.wire.messages import CompressedModelUpdate, ModelUpdate

RESULTS = Path(__file__).resolve().parent / "results" / "sim_compression.json"
TARGET = 0.90

ROWS: list[tuple[str, list[str]]] = [
    ("none (float32)", []),
    ("fp16", ["quantize:16"]),
    ("int8", ["quantize:8"]),
    ("int8+zstd", ["quantize:8", "zstd:3"]),
    ("top-10%+EF", ["delta", "topk:0.1"]),
    ("top-1%+EF+int8+zstd", ["delta", "topk:0.01", "quantize:8", "zstd:3"]),
    ("top-1%+EF", ["delta", "topk:0.01"]),
    ("top-1% without EF", ["delta", "topk:0.01:noef"]),
    ("delta+int8+zstd", ["delta", "quantize:8", "zstd:3"]),
    ("top-10%+EF+int8+zstd", ["delta", "topk:0.1", "quantize:8", "zstd:3"]),
    ("top-3%+EF+int4+zstd", ["delta", "topk:0.03", "quantize:4", "zstd:3"]),
    ("top-1%+EF+int4+zstd", ["delta", "topk:0.01", "quantize:4", "zstd:3"]),
]


def codecs(
    stages: list[str], nodes: int, seed: int, dim: int, keyframe_every: int
) -> tuple[list[str], list[int], Pipeline | None, list[UpdateEncoder], list[UpdateDecoder]]:
    """Peer ids, per-node seeds, and each node's encoder (none without a pipeline) and
    decoder, as real nodes would have them."""
    # 32 characters, like real peer ids (base32 of 20 bytes); sorted order = index order
    ids = [f"node{i:028d}" for i in range(nodes)]
    seeds = [node_seed(seed, i) for i in range(nodes)]
    pipeline = parse_pipeline(stages) if stages else None
    encoders = [
        UpdateEncoder(pipeline, keyframe_every=keyframe_every, seed=seeds[i])
        for i in range(nodes)
        if pipeline is not None
    ]
    decoders = [UpdateDecoder(dim, max_frame_size=1 << 26) for _ in range(nodes)]
    return ids, seeds, pipeline, encoders, decoders


def train_round(
    models: list[Any],
    params: list[np.ndarray],
    shards: list[tuple[np.ndarray, np.ndarray]],
    seeds: list[int],
    r: int,
    epochs: int,
    lr: float,
    batch_size: int,
) -> list[np.ndarray]:
    """Every node's local training for round r, from its current parameters."""
    trained = []
    for i, model in enumerate(models):
        model.set_params(params[i])
        x, y = shards[i]
        rng = np.random.default_rng([seeds[i], i, r])
        model.fit(x, y, epochs=epochs, lr=lr, batch_size=batch_size, rng=rng)
        trained.append(model.get_params())
    return trained


def simulate(
    stages: list[str],
    *,
    nodes: int,
    rounds: int,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    hidden: int,
    keyframe_every: int,
) -> dict[str, Any]:
    ds = load_dataset("digits", seed=seed)
    shards = [node_shard(ds, i, nodes, scheme="iid", seed=seed) for i in range(nodes)]
    models = [
        build_model("mlp", ds.n_features, ds.n_classes, seed=seed, hidden=hidden)
        for _ in range(nodes)
    ]
    evaluator = build_model("mlp", ds.n_features, ds.n_classes, seed=seed, hidden=hidden)
    params = [m.get_params() for m in models]
    dim = params[0].size
    ids, seeds, pipeline, encoders, decoders = codecs(stages, nodes, seed, dim, keyframe_every)
    accuracy: list[float] = []
    message_bytes: list[int] = []
    for r in range(rounds):
        trained = train_round(models, params, shards, seeds, r, epochs, lr, batch_size)
        # received[j][i]: what node j holds for sender i after this round's message
        received = [list(trained) for _ in range(nodes)]
        for i in range(nodes):
            if pipeline is None:
                message_bytes.append(len(encode(ModelUpdate(ids[i], r, trained[i], 1))))
                continue
            blob = encoders[i].encode(trained[i], r)
            message_bytes.append(len(encode(CompressedModelUpdate(ids[i], r, blob, 1))))
            for j in range(nodes):
                if j != i:
                    received[j][i] = decoders[j].decode(ids[i], r, blob)
        accs = []
        for j in range(nodes):
            inputs = [trained[j] if i == j else received[j][i] for i in range(nodes)]
            weights = np.array([len(shards[i][1]) for i in range(nodes)], dtype=np.float64)
            params[j] = mean(np.stack(inputs), weights, trained[j])
            evaluator.set_params(params[j])
            accs.append(evaluator.evaluate(ds.x_test, ds.y_test)["accuracy"])
        accuracy.append(float(np.mean(accs)))
    per_update = float(np.mean(message_bytes))
    return {
        "stages": stages,
        "dim": dim,
        "float32_bytes": 4 * dim,
        "bytes_per_update": per_update,
        "bytes_per_round_per_node": per_update * (nodes - 1),
        "ratio_vs_float32": 4 * dim / per_update,
        "final_accuracy_mean": accuracy[-1],
        "accuracy_by_round": [round(a, 4) for a in accuracy],
    }


def _summary(name: str, stages: list[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Average over seeds: bytes, and the seed-averaged accuracy curve."""
    curve = np.mean([r["accuracy_by_round"] for r in runs], axis=0)
    reached = next((i + 1 for i, a in enumerate(curve) if a >= TARGET), None)
    per_update = float(np.mean([r["bytes_per_update"] for r in runs]))
    return {
        "name": name,
        "stages": stages,
        "bytes_per_update": per_update,
        "bytes_per_round_per_node": float(np.mean([r["bytes_per_round_per_node"] for r in runs])),
        "ratio_vs_float32": runs[0]["float32_bytes"] / per_update,
        "final_accuracy_mean": float(curve[-1]),
        "final_accuracy_by_seed": [r["final_accuracy_mean"] for r in runs],
        "rounds_to_target": reached,
        "accuracy_by_round": [round(float(a), 4) for a in curve],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--keyframe-every", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(
        f"digits, MLP(hidden={args.hidden}), {args.nodes} nodes full mesh, {args.rounds} rounds, "
        f"epochs={args.epochs} lr={args.lr} batch={args.batch_size}, seeds {args.seeds} "
        "(simulation; accuracy = mean over nodes, averaged over seeds)"
    )
    tables: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for every in args.keyframe_every:
        print(f"\nkeyframe_every = {every}\n")
        print("| pipeline | bytes/update | bytes/round/node | ratio | final acc | rounds to 0.90 |")
        print("|---|---:|---:|---:|---:|---:|")
        rows = tables[str(every)] = []
        for name, stages in ROWS:
            runs = [
                simulate(
                    stages,
                    nodes=args.nodes,
                    rounds=args.rounds,
                    seed=seed,
                    epochs=args.epochs,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    hidden=args.hidden,
                    keyframe_every=every,
                )
                for seed in args.seeds
            ]
            res = _summary(name, stages, runs)
            rows.append(res)
            reached = res["rounds_to_target"]
            print(
                f"| {name} `{json.dumps(stages)}` | {res['bytes_per_update']:.0f} | "
                f"{res['bytes_per_round_per_node']:.0f} | {res['ratio_vs_float32']:.1f}x | "
                f"{res['final_accuracy_mean']:.4f} | {reached if reached else '-'} |",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"settings": settings, "seconds": round(time.perf_counter() - start, 1), "tables": tables}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
