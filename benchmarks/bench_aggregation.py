"""Aggregation throughput: every rule next to numpy baselines on the same array.

Run: python benchmarks/bench_aggregation.py [--quick]

For n inputs of d float32 coordinates (n in {8, 16, 32}, d in {1e5, 1e6}) it times each
rule of `p2pfl.aggregation` (f = n // 5 tolerated attackers, default options) and,
in the same interleaved loop, three baselines: `np.sum(axis=0)` (reading the input
once: the memory-bandwidth bound), `np.mean(axis=0)` and `np.median(axis=0)`.
Reported: best-of-reps time, throughput in inputs x coordinates per second, and each
rule's time as a multiple of the bound and of np.median. Below the rules, the numpy
floor of the median and trimmed mean: their sorting networks' pass count times one
measured in-cache `np.minimum` pass (a lower bound for any numpy-only network).
When Flower (`flwr`) is importable, its server-side helpers run on the same arrays in
the same interleaved loop (`aggregate` for the weighted mean, `aggregate_median`,
`aggregate_trimmed_avg`, `aggregate_krum` and its Multi-Krum form) and each p2pfl rule
is reported as a speed-up over its Flower counterpart; without it the table says so.
The weighted mean's largest relative error against a float64 computation of the same
mean is reported too (p2pfl accumulates in float32).
Writes benchmarks/results/bench_aggregation.json.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from p2pfl.aggregation import RULE_NAMES, make_rule, sortnet
from p2pfl.aggregation.coordinate import trim_count

RESULTS = Path(__file__).resolve().parent / "results" / "bench_aggregation.json"
BASELINES = ("np.sum (bound)", "np.mean", "np.median")
BUCKETED = ("median", "self_centered_clipping")


def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best-of-reps seconds per function, each timed once per repetition in turn.

    Interleaving spreads load changes over the rules and the baselines alike, and the
    minimum is the least disturbed sample on a shared machine (other processes only
    ever add time to a CPU-bound call).
    """
    for fn in fns.values():
        fn()  # warm-up: page in, fill allocator pools, build sorting networks
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def _inputs(n: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model plus small per-node deltas (what a node really aggregates)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(d, dtype=np.float32)
    x = base + 0.01 * rng.standard_normal((n, d), dtype=np.float32)
    return np.ascontiguousarray(x), np.full(n, 100.0), x[0].copy()


def _pass_seconds_per_coordinate(reps: int = 400) -> float:
    """Best time of one `np.minimum` pass over a cache-resident block, per coordinate.

    What every comparator of a numpy sorting network costs at least (the call overhead
    at this block size included, the misses on the streamed input excluded).
    """
    a, b = np.random.default_rng(1).standard_normal((2, sortnet.BLOCK), dtype=np.float32)
    out = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            np.minimum(a, b, out=out)
        best = min(best, (time.perf_counter() - start) / reps)
    return best / sortnet.BLOCK


def network_passes(n: int, f: int) -> dict[str, int]:
    """Element-wise passes (one ufunc call per block each) of the median and trimmed
    mean at n inputs: their compiled networks' steps, plus the trimmed mean's adds."""
    b = trim_count(n, f=f, beta=None)
    median_steps, _, _ = sortnet.compile_network(n, ((n - 1) // 2, n // 2), False)
    tails = (*range(b), *range(n - b, n))
    trim_steps, _, _ = sortnet.compile_network(n, tails, True)
    return {"median": len(median_steps), "trimmed_mean": len(trim_steps) + n - 2 * b - 1}


# p2pfl rule -> the Flower helper that computes the same thing
FLOWER_OF = {
    "mean": "flwr aggregate",
    "median": "flwr aggregate_median",
    "trimmed_mean": "flwr aggregate_trimmed_avg",
    "krum": "flwr aggregate_krum",
    "multi_krum": "flwr aggregate_krum (multi)",
}


def flower_helpers(x: np.ndarray, w: np.ndarray, f: int) -> dict[str, Callable[[], object]] | None:
    """Flower's server-side aggregation helpers on the same inputs (each input one
    single-layer NDArrays with its sample count), or None when flwr is not installed."""
    try:
        from flwr.server.strategy import aggregate as fl
    except ImportError:
        return None
    results = [([x[i]], int(w[i])) for i in range(x.shape[0])]
    trim = trim_count(x.shape[0], f=f, beta=None) / x.shape[0]
    return {
        "flwr aggregate": lambda: fl.aggregate(results),
        "flwr aggregate_median": lambda: fl.aggregate_median(results),
        "flwr aggregate_trimmed_avg": lambda: fl.aggregate_trimmed_avg(results, trim),
        "flwr aggregate_krum": lambda: fl.aggregate_krum(results, f, 0),
        "flwr aggregate_krum (multi)": lambda: fl.aggregate_krum(results, f, x.shape[0] - f),
    }


def bench(n: int, d: int, reps: int) -> dict[str, Any]:
    x, w, own = _inputs(n, d)
    f = n // 5
    fns: dict[str, Callable[[], object]] = {
        "np.sum (bound)": lambda: np.sum(x, axis=0),
        "np.mean": lambda: np.mean(x, axis=0),
        "np.median": lambda: np.median(x, axis=0),
    }
    rules = [make_rule(name, f=f) for name in RULE_NAMES]
    rules += [make_rule(name, f=f, options={"bucket_size": 2}) for name in BUCKETED]
    for rule in rules:
        fns[rule.name] = functools.partial(rule, x, w, own)
    flower = flower_helpers(x, w, f)
    fns.update(flower or {})
    secs = _interleaved(fns, reps)
    bound, med, mean = secs["np.sum (bound)"], secs["np.median"], secs["np.mean"]
    rows = {
        name: {
            "seconds": t,
            "throughput": n * d / t,
            "x_bound": t / bound,
            "x_np_median": t / med,
            "x_np_mean": t / mean,
        }
        for name, t in secs.items()
    }
    for name, flower_name in FLOWER_OF.items():
        if name in rows and flower_name in secs:
            rows[name]["x_faster_than_flower"] = secs[flower_name] / rows[name]["seconds"]
    reference = (w / w.sum()) @ x.astype(np.float64)
    mean_error = float(
        np.max(np.abs(make_rule("mean")(x, w, own) - reference)) / np.max(np.abs(reference))
    )
    # The numpy floor: no network of ufunc calls can beat (passes x one pass's time).
    per_coord = _pass_seconds_per_coordinate()
    floors = {
        name: {"passes": p, "seconds": p * d * per_coord, "x_bound": p * d * per_coord / bound}
        for name, p in network_passes(n, f).items()
    }
    return {
        "n": n,
        "d": d,
        "f": f,
        "rows": rows,
        "numpy_network_floor": floors,
        "flower": flower is not None,
        "mean_max_relative_error_vs_float64": mean_error,
    }


def _table(result: dict[str, Any]) -> Table:
    n, d, f = result["n"], result["d"], result["f"]
    caption = (
        f"mean: largest relative error vs float64 "
        f"{result['mean_max_relative_error_vs_float64']:.1e}; "
        + ("Flower's helpers ran in the same loop" if result["flower"] else
           "flwr not installed: no Flower columns (pip install flwr)")
    )  # fmt: skip
    table = Table(title=f"n = {n} inputs, d = {d:.0e} coordinates, f = {f}", caption=caption)
    cols = ("rule", "ms", "Gcoord/s", "x bound (np.sum)", "x np.median", "x np.mean", "vs Flower")
    for col in cols:
        table.add_column(col, justify="right" if col != "rule" else "left")
    for name, r in result["rows"].items():
        style = "dim" if name in BASELINES or name.startswith("flwr") else None
        faster = r.get("x_faster_than_flower")
        table.add_row(
            name,
            f"{r['seconds'] * 1e3:.2f}",
            f"{r['throughput'] / 1e9:.2f}",
            f"{r['x_bound']:.1f}",
            f"{r['x_np_median']:.2f}",
            f"{r['x_np_mean']:.1f}",
            "" if faster is None else f"{faster:.1f}x faster",
            style=style,
        )
    for name, fl in result["numpy_network_floor"].items():
        table.add_row(
            f"[dim]floor: {name} ({fl['passes']} passes)[/dim]",
            f"{fl['seconds'] * 1e3:.2f}",
            f"{n * d / fl['seconds'] / 1e9:.2f}",
            f"{fl['x_bound']:.1f}",
            "",
            "",
            "",
            style="dim",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 1e5 only, 3 repetitions")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    console = Console()
    dims = (100_000,) if args.quick else (100_000, 1_000_000)
    reps = 3 if args.quick else args.reps
    results = []
    for d in dims:
        for n in (8, 16, 32):
            result = bench(n, d, reps)
            results.append(result)
            console.print(_table(result))
    doc = {
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "cpu": platform.processor() or platform.machine()},
        "reps": reps,
        "results": results,
    }  # fmt: skip
    if not args.quick:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
        console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
