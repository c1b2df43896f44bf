"""Codec throughput: ModelUpdate encode + frame + deframe + decode, versus pickle.

Run: python benchmarks/bench_codec.py [--quick]

pickle appears here only as an in-process baseline (it is never used on the wire): it
is the usual "fast path" for numpy arrays, so it tells whether the msgpack codec with
its validation costs anything that matters. Both sides go through the same framing.
Prints a rich table and writes benchmarks/results/bench_codec.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from rich.console import Console
from rich.table import Table

from p2pfl.wire import FrameDecoder, frame
from p2pfl.wire.codec import decode, encode_frame
from p2pfl.wire.messages import ModelUpdate

RESULTS = Path(__file__).resolve().parent / "results" / "bench_codec.json"


def _interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Time each function once per repetition, in turn, so load changes hit all alike."""
    for fn in fns.values():
        fn()  # warm-up: page in buffers, fill allocator pools
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _deframe(data: bytes) -> bytes:
    decoder = FrameDecoder()
    decoder.feed(data)
    payload = decoder.next_frame()
    assert payload is not None
    return payload


def bench_size(n: int, reps: int) -> dict[str, Any]:
    params = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    msg = ModelUpdate("bench-peer", 12, params, 1000)
    nbytes = params.nbytes

    wire = encode_frame(msg)
    back = decode(_deframe(wire))
    assert isinstance(back, ModelUpdate) and np.array_equal(back.params, params)
    pickled = frame(pickle.dumps(params, protocol=pickle.HIGHEST_PROTOCOL))
    assert np.array_equal(pickle.loads(_deframe(pickled)), params)

    def ours_encode() -> object:
        return encode_frame(msg)

    def ours_decode() -> object:
        return decode(_deframe(wire))

    def ours_round_trip() -> object:
        return decode(_deframe(encode_frame(msg)))

    def pickle_round_trip() -> object:
        data = frame(pickle.dumps(params, protocol=pickle.HIGHEST_PROTOCOL))
        return pickle.loads(_deframe(data))

    times = _interleaved_medians(
        {
            "encode": ours_encode,
            "decode": ours_decode,
            "ours": ours_round_trip,
            "pickle": pickle_round_trip,
        },
        reps,
    )
    enc, dec, ours, base = (
        statistics.median(times[k]) for k in ("encode", "decode", "ours", "pickle")
    )
    ours_all, base_all = times["ours"], times["pickle"]
    mb = nbytes / 1e6
    return {
        "params": n,
        "payload_bytes": len(wire),
        "pickle_bytes": len(pickled),
        "encode_ms": enc * 1e3,
        "decode_ms": dec * 1e3,
        "round_trip_ms": ours * 1e3,
        "round_trip_mb_s": mb / ours,
        "pickle_round_trip_ms": base * 1e3,
        "pickle_round_trip_mb_s": mb / base,
        "ratio_vs_pickle": base / ours,
        "round_trip_samples_ms": [t * 1e3 for t in ours_all],
        "pickle_samples_ms": [t * 1e3 for t in base_all],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 11")
    args = parser.parse_args()
    reps = 3 if args.quick else 11
    sizes = [1_000_000, 10_000_000]

    rows = [bench_size(n, reps) for n in sizes]

    table = Table(title=f"p2pfl codec: ModelUpdate float32, framed, median of {reps}")
    for column in (
        "params",
        "MB",
        "encode ms",
        "decode ms",
        "p2pfl MB/s",
        "pickle MB/s",
        "p2pfl / pickle",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r['params']:,}",
            f"{r['params'] * 4 / 1e6:.0f}",
            f"{r['encode_ms']:.2f}",
            f"{r['decode_ms']:.2f}",
            f"{r['round_trip_mb_s']:,.0f}",
            f"{r['pickle_round_trip_mb_s']:,.0f}",
            f"{r['ratio_vs_pickle']:.2f}x",
        )
    Console().print(table)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_codec",
        "repetitions": reps,
        "quick": args.quick,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "machine": platform.machine(),
        "results": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
