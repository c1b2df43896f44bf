"""Compression throughput and ratio on real model updates, versus plain msgpack.

Run: python benchmarks/bench_compression.py [--quick]

Random float32 barely compresses (zstd ~1.08x), so the updates here come from a real
training run: 4 nodes learn the digits with p2pfl.learning's MLP (several rounds of
local SGD, sample-weighted mean aggregation) and node 0's model after local training
at every round is the sequence a node would send. Two widths: the default MLP
(hidden=32, 2410 parameters, what the scenarios use) and a wide one (hidden=1024,
76810 parameters) where per-call overheads no longer dominate.

Every stage alone (where it is meaningful alone) and the default pipelines encode the
whole sequence with a fresh encoder; the first message is a keyframe and is reported
separately, the timings and ratios are for the steady-state messages after it (all
of them keyframes for pipelines without delta). Encode = UpdateEncoder.encode +
msgpack.packb of the blob; decode = msgpack.unpackb + UpdateDecoder.decode. MB/s are
float32 megabytes of model per second. The baseline, in the same run, is plain
msgpack of the float32 bytes (packb, then unpackb + np.frombuffer).
Prints a rich table and writes benchmarks/results/bench_compression.json.

`--wire-format` instead compares the message sizes of the wire format before and
after 2026-12-04 (stage names, nested payload and whole-byte index gaps, always
zstd; versus flags, one-letter keys and Elias-Fano indices, zstd when it helps) on
real updates at d = 2410, ~1e5 and ~1e6, split into the per-message header and the
body, and writes benchmarks/results/bench_compression_format.json. The old format
is rebuilt here from each new message (same indices, same quantized values), so
the two columns differ only by the encoding.
"""

from __future__ import annotations

import argparse
import gc
import json
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

from p2pfl.aggregation import mean
from p2pfl.compression import UpdateDecoder, UpdateEncoder, parse_pipeline
from p2pfl.compression.entropy import compressor
from p2pfl.compression.frame import parse_header
from p2pfl.compression.pipeline import TopK
from p2pfl.compression.sparse import decode_indices, index_size
from p2pfl.learning import build_model, load_dataset, node_shard
from p2pfl.wire.codec import encode
from p2pfl.wire.messages import CompressedModelUpdate

RESULTS = Path(__file__).resolve().parent / "results" / "bench_compression.json"
FORMAT_RESULTS = Path(__file__).resolve().parent / "results" / "bench_compression_format.json"

CASES: list[tuple[str, list[str] | None]] = [
    ("msgpack float32 (baseline)", None),
    ("zstd:3 alone", ["zstd:3"]),
    ("quantize:16", ["quantize:16"]),
    ("quantize:8", ["quantize:8"]),
    ("quantize:8s", ["quantize:8s"]),
    ("quantize:4", ["quantize:4"]),
    ("delta", ["delta"]),
    ("delta+zstd:3", ["delta", "zstd:3"]),
    ("delta+topk:0.1", ["delta", "topk:0.1"]),
    ("delta+topk:0.01", ["delta", "topk:0.01"]),
    ("int8+zstd", ["quantize:8", "zstd:3"]),
    ("delta+int8+zstd", ["delta", "quantize:8", "zstd:3"]),
    ("top-10%+int8+zstd", ["delta", "topk:0.1", "quantize:8", "zstd:3"]),
    ("top-3%+int4+zstd", ["delta", "topk:0.03", "quantize:4", "zstd:3"]),
    ("top-1%+int8+zstd", ["delta", "topk:0.01", "quantize:8", "zstd:3"]),
    ("top-1%+int8+zstd:19", ["delta", "topk:0.01", "quantize:8", "zstd:19"]),
]


def training_updates(hidden: int, rounds: int, nodes: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Node 0's model after local training, round by round, in a small federation."""
    ds = load_dataset("digits", seed=seed)
    shards = [node_shard(ds, i, nodes, seed=seed) for i in range(nodes)]
    models = [
        build_model("mlp", ds.n_features, ds.n_classes, seed=seed, hidden=hidden)
        for _ in range(nodes)
    ]
    params = [m.get_params() for m in models]
    weights = np.array([len(y) for _, y in shards], dtype=np.float64)
    out = []
    for r in range(rounds):
        trained = []
        for i, model in enumerate(models):
            model.set_params(params[i])
            x, y = shards[i]
            model.fit(x, y, epochs=1, lr=0.05, batch_size=32, rng=np.random.default_rng([i, r]))
            trained.append(model.get_params())
        out.append(trained[0])
        stacked = np.stack(trained)
        params = [mean(stacked, weights, trained[i]) for i in range(nodes)]
    return out


def _run_pipeline(stages: list[str], seq: list[np.ndarray]) -> dict[str, Any]:
    """Encode+decode the whole sequence once; per-message times and sizes after message 0."""
    enc = UpdateEncoder(parse_pipeline(stages), keyframe_every=0)
    dec = UpdateDecoder(seq[0].size, max_frame_size=1 << 28)
    enc_t, dec_t, sizes = [], [], []
    keyframe = 0
    for r, params in enumerate(seq):
        t0 = time.perf_counter()
        data = msgpack.packb(enc.encode(params, r), use_bin_type=True)
        t1 = time.perf_counter()
        got = dec.decode("s", r, msgpack.unpackb(data, raw=False))
        t2 = time.perf_counter()
        if r == 0:
            keyframe = len(data)
            continue
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
        sizes.append(len(data))
    err = float(np.linalg.norm(got - seq[-1]) / np.linalg.norm(seq[-1]))
    return {"enc": enc_t, "dec": dec_t, "sizes": sizes, "keyframe": keyframe, "rel_error": err}


def _run_baseline(seq: list[np.ndarray]) -> dict[str, Any]:
    enc_t, dec_t, sizes = [], [], []
    for params in seq[1:]:
        t0 = time.perf_counter()
        data = msgpack.packb(memoryview(params).cast("B"), use_bin_type=True)
        t1 = time.perf_counter()
        got = np.frombuffer(msgpack.unpackb(data, raw=False), dtype="<f4")
        t2 = time.perf_counter()
        assert got.size == params.size
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
        sizes.append(len(data))
    return {"enc": enc_t, "dec": dec_t, "sizes": sizes, "keyframe": sizes[0], "rel_error": 0.0}


def bench_model(hidden: int, rounds: int, reps: int) -> dict[str, Any]:
    seq = training_updates(hidden, rounds)
    raw = 4 * seq[0].size
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        name: (
            (lambda: _run_baseline(seq))
            if stages is None
            else (lambda stages=stages: _run_pipeline(stages, seq))  # type: ignore[misc]
        )
        for name, stages in CASES
    }
    for run in runners.values():
        run()  # warm-up
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
    for _ in range(reps):  # interleaved, so load changes hit every case alike
        for name, run in runners.items():
            gc.collect()
            samples[name].append(run())
    rows = []
    for name, stages in CASES:
        runs = samples[name]
        enc = statistics.median(t for r in runs for t in r["enc"])
        dec = statistics.median(t for r in runs for t in r["dec"])
        size = statistics.mean(runs[0]["sizes"])
        rows.append(
            {
                "case": name,
                "stages": stages,
                "encode_MBps": raw / enc / 1e6,
                "decode_MBps": raw / dec / 1e6,
                "bytes": size,
                "ratio": raw / size,
                "keyframe_bytes": runs[0]["keyframe"],
                "rel_error_last": runs[0]["rel_error"],
            }
        )
    return {"hidden": hidden, "params": seq[0].size, "float32_bytes": raw, "rows": rows}


FORMAT_CASES: list[tuple[str, list[str]]] = [
    ("top-3%+int4+zstd", ["delta", "topk:0.03", "quantize:4", "zstd:3"]),
    ("top-6%+int4+zstd", ["delta", "topk:0.06", "quantize:4", "zstd:3"]),
    ("top-1%+int8+zstd", ["delta", "topk:0.01", "quantize:8", "zstd:3"]),
    ("top-10%+int8+zstd", ["delta", "topk:0.1", "quantize:8", "zstd:3"]),
    ("top-0.1%+int8+zstd", ["delta", "topk:0.001", "quantize:8", "zstd:3"]),
]
SENDER = "b" * 32  # real peer ids are 32 characters


def _old_format(stages: list[str], blob: dict[str, Any], dim: int) -> tuple[int, int, int]:
    """(blob bytes, of which body, index bytes before zstd) of this sparse message in
    the format before 2026-12-04: {"stages", "base", "payload": {"dim", "count", "iw",
    "data"}}, indices as gaps in the narrowest of u1/u2/u4, body always zstd."""
    pipeline = parse_pipeline(stages)
    assert pipeline.topk is not None and pipeline.zstd is not None
    header = parse_header(blob, dim=dim, round=2**40)
    raw = header.data
    if header.zstd:
        raw = zstandard_decompress(raw)
    split = index_size(header.count, dim)
    idx = decode_indices(raw[:split], header.count, dim)
    gaps = np.diff(idx, prepend=-1) - 1
    width = 1 if gaps.max() < 1 << 8 else 2 if gaps.max() < 1 << 16 else 4
    index_bytes = gaps.astype(f"<u{width}").tobytes()
    data = compressor(pipeline.zstd.level).compress(index_bytes + raw[split:])
    wire = [str(s) for s in ("delta", TopK(pipeline.topk.fraction), pipeline.quantize, "zstd:3")]
    old = {
        "stages": wire,
        "base": blob["b"],
        "payload": {"dim": dim, "count": header.count, "iw": width, "data": data},
    }
    return len(msgpack.packb(old, use_bin_type=True)), len(data), len(index_bytes)


def zstandard_decompress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(data)


def bench_format(hidden: int, rounds: int) -> dict[str, Any]:
    seq = training_updates(hidden, rounds)
    dim = seq[0].size
    envelope = len(encode(CompressedModelUpdate(SENDER, 12, {"f": 0}, 100))) - len(
        msgpack.packb({"f": 0})
    )
    rows = []
    for name, stages in FORMAT_CASES:
        enc = UpdateEncoder(parse_pipeline(stages), keyframe_every=0)
        acc: dict[str, list[float]] = {
            k: [] for k in ("old", "old_body", "old_index", "new", "new_body", "new_index", "k")
        }
        for r, params in enumerate(seq):
            blob = enc.encode(params, r)
            if r == 0:
                continue  # the keyframe: dense, no indices
            old, old_body, old_index = _old_format(stages, blob, dim)
            acc["old"].append(old)
            acc["old_body"].append(old_body)
            acc["old_index"].append(old_index)
            acc["new"].append(len(msgpack.packb(blob, use_bin_type=True)))
            acc["new_body"].append(len(blob["x"]))
            acc["new_index"].append(index_size(blob["n"], dim))
            acc["k"].append(blob["n"])
        m = {k: float(np.mean(v)) for k, v in acc.items()}
        rows.append(
            {
                "case": name,
                "stages": stages,
                "dim": dim,
                "count": m["k"],
                "old_blob": m["old"],
                "old_header": m["old"] - m["old_body"],
                "old_body": m["old_body"],
                "old_index_bits_per_index_before_zstd": 8 * m["old_index"] / m["k"],
                "new_blob": m["new"],
                "new_header": m["new"] - m["new_body"],
                "new_body": m["new_body"],
                "new_index_bits_per_index": 8 * m["new_index"] / m["k"],
                "message_envelope": envelope,
                "old_message": m["old"] + envelope,
                "new_message": m["new"] + envelope,
                "float32_bytes": 4 * dim,
            }
        )
    return {"hidden": hidden, "params": dim, "rows": rows}


def main_format(args: argparse.Namespace) -> None:
    console = Console(width=140)
    rounds = 4 if args.quick else 6
    results = []
    for hidden in (32, 1350, 13500):  # 2410, 99910 and 999010 parameters
        res = bench_format(hidden, rounds)
        results.append(res)
        table = Table(
            title=f"d = {res['params']}: steady-state sparse messages, mean of {rounds - 1}; "
            "bytes (old -> new)"
        )
        for col in (
            "case",
            "k",
            "blob header",
            "body",
            "index bits/idx",
            "message",
            "ratio vs float32",
        ):
            table.add_column(col, justify="left" if col == "case" else "right", no_wrap=True)
        for row in res["rows"]:
            f32 = row["float32_bytes"]
            table.add_row(
                row["case"],
                f"{row['count']:.0f}",
                f"{row['old_header']:.0f} -> {row['new_header']:.0f}",
                f"{row['old_body']:.0f} -> {row['new_body']:.0f}",
                f"{row['old_index_bits_per_index_before_zstd']:.1f} -> "
                f"{row['new_index_bits_per_index']:.2f}",
                f"{row['old_message']:.0f} -> {row['new_message']:.0f}",
                f"{f32 / row['old_message']:.1f}x -> {f32 / row['new_message']:.1f}x",
            )
        console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"python": platform.python_version(), "rounds": rounds, "models": results}
    out = FORMAT_RESULTS if args.out == RESULTS else args.out
    out.write_text(json.dumps(doc, indent=1) + "\n")
    console.print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    ap.add_argument("--wire-format", action="store_true", help="old vs new format sizes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.wire_format:
        main_format(args)
        return
    rounds, reps = (5, 2) if args.quick else (10, 5)
    console = Console(width=110)
    results = []
    for hidden in (32, 1024):
        res = bench_model(hidden, rounds, reps)
        results.append(res)
        table = Table(
            title=f"MLP hidden={hidden}: {res['params']} params, {res['float32_bytes']} B float32; "
            f"{rounds - 1} steady-state messages x {reps} reps"
        )
        for col in ("case", "enc MB/s", "dec MB/s", "bytes/msg", "ratio", "keyframe B", "rel err"):
            table.add_column(col, justify="left" if col == "case" else "right", no_wrap=True)
        for row in res["rows"]:
            table.add_row(
                row["case"],
                f"{row['encode_MBps']:.0f}",
                f"{row['decode_MBps']:.0f}",
                f"{row['bytes']:.0f}",
                f"{row['ratio']:.1f}x",
                str(row["keyframe_bytes"]),
                f"{row['rel_error_last']:.1e}",
            )
        console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "rounds": rounds,
        "reps": reps,
        "models": results,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
