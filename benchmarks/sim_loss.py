"""Message loss in virtual time: how long rounds take when frames are dropped.

Run: python benchmarks/sim_loss.py [--runs 5] [--loss 0,0.1,0.2,0.3] [--nodes 8]

Each run is the in-process scenario runner's nodes (in-memory transport, full mesh,
digits, softmax, 20 rounds, round timeout 10 s, every frame on every link dropped with
the given probability) under trio's MockClock: training and transfers take no virtual
time, so the virtual duration is exactly what the protocol spends *waiting* (timeouts,
resend requests, catch-ups), free of machine noise. Reported per loss rate: virtual
seconds (mean, min, max over runs), timed-out node-rounds, catch-ups, node-rounds
trained (of nodes x rounds) and the mean final accuracy.
Writes benchmarks/results/sim_loss.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio.testing
from rich.console import Console
from rich.table import Table

from p2pfl.node import Node
from p2pfl.scenario import parse_scenario
from p2pfl.scenario.inprocess import build_nodes

RESULTS = Path(__file__).resolve().parent / "results" / "sim_loss.json"


def scenario_doc(nodes: int, rounds: int, loss: float, seed: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "sim-loss",
        "nodes": nodes,
        "rounds": rounds,
        "seed": seed,
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"name": "softmax"},
        "training": {"epochs": 1, "lr": 0.05, "batch_size": 32},
        "protocol": {"round_timeout": 10.0},
    }
    if loss > 0:
        doc["faults"] = [{"at_round": 0, "kind": "loss", "probability": loss}]
    return doc


async def _run_all(nodes: list[Node]) -> float:
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        for node in nodes:
            await node.done.wait()
        end = trio.current_time()
        nursery.cancel_scope.cancel()
    return end - start


def one_run(nodes: int, rounds: int, loss: float, seed: int) -> dict[str, Any]:
    scenario = parse_scenario(scenario_doc(nodes, rounds, loss, seed))
    with tempfile.TemporaryDirectory() as tmp:
        built = build_nodes(scenario, Path(tmp))
        clock = trio.testing.MockClock(autojump_threshold=0)
        virtual = trio.run(_run_all, built, clock=clock)
    return {
        "virtual_seconds": round(virtual, 3),
        "timed_out": sum(bool(r.get("timed_out")) for n in built for r in n.history),
        "catch_ups": sum(n.counters["catch_ups"] for n in built),
        "trained": sum(len(n.history) for n in built),
        "accuracy": float(np.mean([n.history[-1]["accuracy"] for n in built if n.history])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loss", default="0,0.1,0.2,0.3", help="comma-separated rates")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # lost frames are logged by design; keep the table
    rates = [float(x) for x in args.loss.split(",") if x]
    console = Console()
    table = Table(title=f"{args.nodes} nodes, {args.rounds} rounds, virtual time (MockClock)")
    for col in ("loss", "virtual s (mean)", "min-max", "timed out", "catch-ups", "trained",
                "accuracy"):  # fmt: skip
        table.add_column(col, justify="right")
    results = []
    for rate in rates:
        runs = [one_run(args.nodes, args.rounds, rate, seed) for seed in range(args.runs)]
        secs = [r["virtual_seconds"] for r in runs]
        results.append({"loss": rate, "runs": runs})
        table.add_row(
            f"{rate:.0%}",
            f"{statistics.mean(secs):.2f}",
            f"{min(secs):.2f}-{max(secs):.2f}",
            f"{statistics.mean(r['timed_out'] for r in runs):.1f}",
            f"{statistics.mean(r['catch_ups'] for r in runs):.1f}",
            f"{statistics.mean(r['trained'] for r in runs):.0f} / {args.nodes * args.rounds}",
            f"{statistics.mean(r['accuracy'] for r in runs):.4f}",
        )
    console.print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    doc = {"nodes": args.nodes, "rounds": args.rounds, "results": results}
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
