"""Measure the example CNN federated over 4 IID shards of digits, WITHOUT the network.

A reference for `p2pfl scenario run examples/torch_cnn/scenario.toml` (the same setup
over the network, see README.md): 4 `build(config)` instances train one local epoch
each round on their own shard (the same shards p2pfl's `--nodes 4 --partition iid` cuts) and are
averaged by plain FedAvg (numpy mean weighted by shard size), in one process. The
global model is evaluated on the shared test set after every round.

    python examples/torch_cnn/fedavg_inprocess.py [--rounds 10] [--nodes 4] [--seed 0]

`--model softmax` or `--model mlp` runs p2pfl's built-in numpy models through the same
loop, for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import build

from p2pfl.learning import build_model, load_dataset, node_shard
from p2pfl.learning.model import Model


@dataclass(frozen=True)
class ExampleConfig:
    """The config fields `build` reads (a p2pfl NodeConfig has them)."""

    node_index: int
    nodes: int
    model_seed: int = 0
    data_seed: int = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--model", choices=("cnn", "softmax", "mlp"), default="cnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ds = load_dataset("digits", seed=args.seed)
    configs = [ExampleConfig(i, args.nodes, args.seed, args.seed) for i in range(args.nodes)]

    def make(config: ExampleConfig) -> Model:
        if args.model == "cnn":
            return build(config)
        return build_model(args.model, ds.n_features, ds.n_classes, seed=config.model_seed)

    models = [make(c) for c in configs]
    evaluator = make(configs[0])  # like the node: a second instance evaluates the aggregate
    shards = [
        node_shard(ds, i, args.nodes, scheme="iid", seed=args.seed) for i in range(args.nodes)
    ]
    weights = np.array([len(y) for _, y in shards], dtype=np.float64)
    weights /= weights.sum()
    global_params = models[0].get_params()
    print(
        f"{args.model}: {args.nodes} nodes, shards {[len(y) for _, y in shards]}, "
        f"{models[0].num_params} params, {args.rounds} rounds"
    )
    t0 = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        trained = []
        for i, (model, (x, y)) in enumerate(zip(models, shards, strict=True)):
            model.set_params(global_params)
            model.fit(
                x,
                y,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                rng=np.random.default_rng([args.seed, i, rnd]),
            )
            trained.append(model.get_params())
        global_params = np.average(np.stack(trained), axis=0, weights=weights).astype(np.float32)
        evaluator.set_params(global_params)
        metrics = evaluator.evaluate(ds.x_test, ds.y_test)
        print(
            f"round {rnd:2d} | acc {metrics['accuracy']:.4f} loss {metrics['loss']:.4f} "
            f"| {time.perf_counter() - t0:.1f}s"
        )
    print(f"final test accuracy {metrics['accuracy']:.4f} after {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
