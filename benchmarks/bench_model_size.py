"""How a round's cost grows with model size: 4 real node processes, 1e4..1e7 parameters.

Run: python benchmarks/bench_model_size.py [--quick] [--backend auto|numpy|torch] [--threads 1]

For each size, four `p2pfl node` processes on 127.0.0.1 (distinct ports, data dirs in a
temp dir, full mesh by `--peer`, mDNS and peer exchange off) train the digits data set
(64 features, 10 classes, iid shards) for one round. The model is the built-in numpy MLP
with (64 + 1) * H + (H + 1) * 10 parameters (H = 133, 1333, 13333, 133333 give ~1e4, 1e5,
1e6, 1e7) and, when torch is installed and the node accepts plugin models, the same MLP
in torch (`--model file.py:build` through p2pfl.adapters.torch), both with `--backend
auto`. Each node gets one compute thread (`--threads`: 4 nodes share the machine).

Each node's metrics row gives the round's real seconds split into:
- train, encode (our update to wire bytes), aggregate (the rule) and eval (the aggregate
  on the test split, after the round's wall time ends): the node's own timing;
- wait = the round's wall time minus train, encode and aggregate: waiting for the
  neighbours' updates, i.e. TLS transfer, decode, and any neighbour still training;
- network = wait minus that straggler time, estimated as the slowest node's train +
  encode minus this node's, assuming the four rounds start together (each node starts
  once its 3 peers are connected and have said hello; not measured). The node does not
  time its transfers itself; "MB/s in" is the bytes a node received over this estimate.
It is set against the bytes/s of the TLS transport measured in this run, in this
process, on the same payload size (`bench_transport.transport`: TLS 1.3 + framing;
sender and receiver share one thread there, two processes could go faster).

Heartbeats: `--heartbeat-interval 0.5`; node 0's control socket is polled every 0.2 s
through the round and for a few idle seconds after every node finished. Each new
`rtt_ms` a peer shows is one Ping/Pong sample (node 0 pings a quiet peer every beat,
a busy one every 5th beat); the RTT includes both event loops and the FIFO send queue
(a Pong waits behind a model update queued before it). The status call's own latency
shows node 0's event loop stalls (evaluation and checkpoint writing run on it). The
polling is not free: a status reply hashes the whole model on the event loop (~45 ms
at 1e7), and node 0 trains slower than the others, which the "network" estimate removes.

No node outlives the script: each runs in its own process group and every exit path
(end, error, Ctrl-C, SIGTERM) stops them all. Prints two rich tables and writes
benchmarks/results/bench_model_size.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio
from rich.console import Console
from rich.table import Table

from p2pfl.control.client import ControlError, query
from p2pfl.identity import Identity
from p2pfl.scenario.processes import (
    NodeProcess,
    _exit_status,
    _read_jsonl,
    _signals_raise,
    _spawn,
    _stop_all,
    free_ports,
    node_argv,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transport  # sibling benchmark: its TLS transport sender

RESULTS = Path(__file__).resolve().parent / "results" / "bench_model_size.json"
NODES = 4
HIDDEN = {"1e4": 133, "1e5": 1333, "1e6": 13333, "1e7": 133333}
QUICK = ("1e4", "1e5", "1e6")
POLL = 0.2  # seconds between node 0 status reads
IDLE_SECONDS = 4.0  # heartbeat sampling once every node finished its round
SETTLE = 1.0  # seconds after the last row before "idle" samples count
TLS_REPS = 5

TORCH_PLUGIN = textwrap.dedent(
    '''\
    """The built-in MLP's shape in torch, for bench_model_size (written by it)."""
    import torch

    from p2pfl.adapters.torch import TorchModel


    def build(config):
        torch.manual_seed(config.model_seed)
        module = torch.nn.Sequential(
            torch.nn.Linear(64, config.hidden), torch.nn.ReLU(), torch.nn.Linear(config.hidden, 10)
        )
        return TorchModel(module)
    '''
)

console = Console(width=160)


def mlp_params(hidden: int) -> int:
    return (64 + 1) * hidden + (hidden + 1) * 10


# ---- the TLS transport's throughput, in this process ---------------------------------


async def _tls_run(n_bytes: int, reps: int) -> list[float]:
    payload = np.random.default_rng(0).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    a, b = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    times = []
    async with trio.open_nursery() as nursery:
        send, _address = await bench_transport.transport(nursery, a, b)
        if await send(payload) != payload:  # warm-up, and the bytes arrive intact
            raise AssertionError("TLS transport corrupted the payload")
        for _ in range(reps):
            start = time.perf_counter()
            await send(payload)
            times.append(time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return times


def tls_throughput(n_bytes: int, reps: int = TLS_REPS) -> dict[str, Any]:
    times = trio.run(_tls_run, n_bytes, reps)
    med = statistics.median(times)
    return {"payload_bytes": n_bytes, "median_s": med, "bytes_per_s": n_bytes / med}


# ---- which model implementation ------------------------------------------------------


def plugin_models_accepted() -> bool:
    """Does this node's config take `file.py:callable` models yet?"""
    from p2pfl.config import ConfigError, NodeConfig

    try:
        NodeConfig(model="bench_torch_model.py:build", mdns=False).validated()
    except ConfigError as exc:
        return exc.field != "model"
    except Exception:
        return False
    return True


def pick_backend(choice: str) -> str:
    """numpy, or torch when asked for (auto: when installed and accepted by the node)."""
    torch_ok = importlib.util.find_spec("torch") is not None
    if choice == "numpy":
        return "numpy"
    if choice == "torch":
        if not torch_ok or not plugin_models_accepted():
            sys.exit("--backend torch: torch is not installed or the node refuses plugin models")
        return "torch"
    return "torch" if torch_ok and plugin_models_accepted() else "numpy"


# ---- one size: four processes, one round ---------------------------------------------


def read_status(p: NodeProcess, timeout: float = 10.0) -> tuple[dict[str, Any] | None, float]:
    started = time.perf_counter()
    try:
        status = query(p.data_dir / "control.sock", timeout=timeout)
    except ControlError:
        status = None
    return status, time.perf_counter() - started


def run_size(
    label: str, hidden: int, workdir: Path, args: argparse.Namespace, model: str
) -> dict[str, Any]:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(NODES)]
    dirs = [workdir / label / f"n{i}" for i in range(NODES)]
    procs: list[NodeProcess] = []
    samples: list[dict[str, Any]] = []
    last_rtt: dict[str, float | None] = {}
    rows: dict[int, dict[str, Any]] = {}
    t0 = time.monotonic()
    round_began: float | None = None
    all_done: float | None = None
    final: dict[str, Any] | None = None
    try:
        for i in range(NODES):
            values: dict[str, Any] = {
                "data_dir": dirs[i],
                "listen": addresses[i],
                "peers": [a for j, a in enumerate(addresses) if j != i],
                "mdns": False,
                "peer_exchange": False,
                "min_peers": NODES - 1,
                "dataset": "digits",
                "nodes": NODES,
                "node_index": i,
                "model": model,
                "hidden": hidden,
                "rounds": 1,
                "epochs": args.epochs,
                "heartbeat_interval": args.heartbeat_interval,
                "round_timeout": args.round_timeout,
            }
            procs.append(_spawn(f"n{i}", dirs[i], node_argv(values)))
        deadline = t0 + args.timeout
        while True:
            tick = time.monotonic()
            if tick > deadline:
                raise RuntimeError(f"{label}: no result within {args.timeout:.0f} s")
            for p in procs:
                code = _exit_status(p)
                if code is not None:
                    raise RuntimeError(f"{label}: node {p.name} exited ({code}); see {p.log_path}")
            status, latency = read_status(procs[0])
            now = time.monotonic() - t0
            if status is not None:
                phase = status["round"]["phase"]
                if round_began is None and phase != "starting":
                    round_began = now
                fresh = {}
                for peer in status["peers"]:
                    rtt = peer.get("rtt_ms")
                    if rtt is not None and last_rtt.get(peer["id"]) != rtt:
                        fresh[peer["id"][:8]] = rtt
                    last_rtt[peer["id"]] = rtt
                samples.append(
                    {
                        "t": round(now, 3),
                        "status_ms": round(latency * 1e3, 2),
                        "phase": phase,
                        "new_rtt_ms": fresh,
                    }
                )
                final = status
            for i, d in enumerate(dirs):
                if i not in rows:
                    got = _read_jsonl(d / "metrics.jsonl")  # one round: its only row
                    if got:
                        rows[i] = got[0]
            if all_done is None and len(rows) == NODES:
                all_done = now
            if all_done is not None and now > all_done + SETTLE + args.idle:
                break
            time.sleep(max(0.0, POLL - (time.monotonic() - tick)))
        finals = [read_status(p)[0] for p in procs]
    finally:
        _stop_all(procs, grace=5.0)
    assert all_done is not None and final is not None
    lost = []  # links a node dropped on the heartbeat timeout during the run (any node)
    for p in procs:
        text = p.log_path.read_text(errors="replace")
        lost += [f"{p.name}: {ln[9:]}" for ln in text.splitlines() if "heartbeat timeout" in ln]
    result = summarize(label, hidden, rows, samples, round_began, all_done, final)
    result["heartbeat"]["heartbeat_failures_all_nodes"] = sum(
        (f or {}).get("counters", {}).get("heartbeat_failures", 0) for f in finals
    )
    result["heartbeat"]["heartbeat_timeout_log_lines"] = lost
    # Each node's own account of its event loop: the longest task step and who took it.
    result["event_loop"] = {
        p.name: (f or {}).get("event_loop") for p, f in zip(procs, finals, strict=True)
    }
    return result


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "max": max(values)}


def summarize(
    label: str,
    hidden: int,
    rows: dict[int, dict[str, Any]],
    samples: list[dict[str, Any]],
    round_began: float | None,
    all_done: float,
    final: dict[str, Any],
) -> dict[str, Any]:
    nodes = []
    for i in sorted(rows):
        row = rows[i]
        timing = row.get("timing", {})
        own = sum(timing.get(k, 0.0) for k in ("train_s", "encode_s", "aggregate_s"))
        nodes.append(
            {
                "node": i,
                **{k: timing.get(k) for k in ("train_s", "encode_s", "aggregate_s", "eval_s")},
                "network_s": max(0.0, row["seconds"] - own),
                "round_s": row["seconds"],
                "bytes_received": row["bytes_received"],
                "bytes_sent": row["bytes_sent"],
                "update_wire_bytes": row.get("update_wire_bytes"),
                "peers_heard": row["peers_heard"],
                "accuracy_after": row.get("accuracy"),
                "timed_out": row["timed_out"],
            }
        )

    # Waiting includes a neighbour still training. With the round started at about the
    # same time everywhere (all start once their 3 peers are connected), the slowest
    # node's train + encode minus ours is that straggler time; the rest is the network.
    ready = {n["node"]: (n["train_s"] or 0.0) + (n["encode_s"] or 0.0) for n in nodes}
    for n in nodes:
        straggle = max(ready.values()) - ready[n["node"]]
        n["network_est_s"] = max(0.0, n["network_s"] - straggle)

    def med(key: str) -> float:
        return statistics.median(float(n[key] or 0.0) for n in nodes)

    start = round_began if round_began is not None else 0.0
    during = [s for s in samples if start <= s["t"] <= all_done]
    idle = [s for s in samples if s["t"] > all_done + SETTLE]
    params = mlp_params(hidden)
    return {
        "size": label,
        "hidden": hidden,
        "params": params,
        "model_bytes": 4 * params,
        "nodes": nodes,
        "median": {
            k: med(k)
            for k in (
                "train_s",
                "encode_s",
                "network_s",
                "network_est_s",
                "aggregate_s",
                "eval_s",
                "round_s",
                "bytes_received",
            )
        },
        "network_min_s": min(n["network_s"] for n in nodes),
        "peers_heard_min": min(n["peers_heard"] for n in nodes),
        "timed_out": sum(bool(n["timed_out"]) for n in nodes),
        "heartbeat": {
            "rtt_ms_round": _stats([v for s in during for v in s["new_rtt_ms"].values()]),
            "rtt_ms_idle": _stats([v for s in idle for v in s["new_rtt_ms"].values()]),
            "status_ms_round": _stats([s["status_ms"] for s in during]),
            "status_ms_idle": _stats([s["status_ms"] for s in idle]),
            # By node 0's phase when the new RTT was seen: training and evaluation
            # ("finishing") against the transfer and aggregation in between.
            "rtt_ms_by_phase": {
                phase: _stats(
                    [v for s in during if s["phase"] == phase for v in s["new_rtt_ms"].values()]
                )
                for phase in sorted({s["phase"] for s in during})
            },
            "heartbeat_failures": final["counters"].get("heartbeat_failures", 0),
            "reconnects": final["counters"].get("reconnects", 0),
        },
        "samples": samples,
        "round_began_t": round_began,
        "all_done_t": all_done,
    }


# ---- report ----------------------------------------------------------------------------


def _f(x: float | int | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(results: list[dict[str, Any]], epochs: int) -> None:
    cost = Table(
        title=f"p2pfl round cost vs model size: {NODES} processes, 1 round, MLP, "
        f"{epochs} epoch(s), median over nodes (s)"
    )
    for col in (
        "model",
        "params",
        "train",
        "encode",
        "wait",
        "network",
        "aggregate",
        "eval",
        "round",
        "MB in/node",
        "MB/s in",
        "TLS MB/s",
        "at TLS speed",
        "heard",
    ):
        cost.add_column(col, justify="right")
    for r in results:
        m = r["median"]
        tls = r["tls"]["bytes_per_s"]
        net = m["network_est_s"]
        rate = m["bytes_received"] / net if net > 0 else None
        cost.add_row(
            r["backend"],
            f"{r['params']:,}",
            _f(m["train_s"], ".3f"),
            _f(m["encode_s"], ".3f"),
            _f(m["network_s"], ".3f"),
            _f(m["network_est_s"], ".3f"),
            _f(m["aggregate_s"], ".3f"),
            _f(m["eval_s"], ".3f"),
            _f(m["round_s"] + m["eval_s"], ".3f"),
            _f(m["bytes_received"] / 1e6, ".2f"),
            _f(None if rate is None else rate / 1e6, ".0f"),
            _f(tls / 1e6, ".0f"),
            _f(m["bytes_received"] / tls, ".3f"),
            f"{r['peers_heard_min']}/{NODES - 1}",
        )
    console.print(cost)
    hb = Table(title="heartbeat RTT seen by node 0 (ms) and its control socket's latency (ms)")
    for col in (
        "model",
        "params",
        "RTT idle med",
        "idle max",
        "RTT round med",
        "round max",
        "samples",
        "status idle max",
        "status round med",
        "round max",
        "hb failures",
    ):
        hb.add_column(col, justify="right")
    for r in results:
        h = r["heartbeat"]
        hb.add_row(
            r["backend"],
            f"{r['params']:,}",
            _f(h["rtt_ms_idle"]["median"], ".1f"),
            _f(h["rtt_ms_idle"]["max"], ".1f"),
            _f(h["rtt_ms_round"]["median"], ".1f"),
            _f(h["rtt_ms_round"]["max"], ".1f"),
            f"{h['rtt_ms_idle']['n']}/{h['rtt_ms_round']['n']}",
            _f(h["status_ms_idle"]["max"], ".1f"),
            _f(h["status_ms_round"]["median"], ".1f"),
            _f(h["status_ms_round"]["max"], ".1f"),
            str(h["heartbeat_failures_all_nodes"]),
        )
    console.print(hb)


def main() -> None:
    global NODES
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e4..1e6 only (no 1e7)")
    parser.add_argument(
        "--sizes", default=None, help=f"comma list of sizes among {', '.join(HIDDEN)}"
    )
    parser.add_argument(
        "--nodes", type=int, default=NODES, help="node processes (fewer: fewer per core)"
    )
    parser.add_argument("--backend", choices=("auto", "numpy", "torch"), default="auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="idle seconds sampled")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per size, at most")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads per node (OMP/OpenBLAS/MKL; 0 = library default)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the nodes' data dirs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    NODES = args.nodes
    if args.sizes is not None:
        unknown = sorted(set(args.sizes.split(",")) - set(HIDDEN))
        if unknown:
            parser.error(f"unknown size(s) {', '.join(unknown)}; choose among {', '.join(HIDDEN)}")

    if args.threads > 0:  # inherited by the node processes
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    if args.backend == "auto":  # numpy, and torch too when it can be used
        backends = sorted({"numpy", pick_backend("auto")})
    else:
        backends = [args.backend]
        if args.backend == "torch":
            pick_backend("torch")  # exits with a reason if torch cannot be used
    sizes = tuple(args.sizes.split(",")) if args.sizes else QUICK if args.quick else tuple(HIDDEN)
    workdir = Path(tempfile.mkdtemp(prefix="p2pfl-size-"))
    plugin = workdir / "bench_torch_model.py"
    plugin.write_text(TORCH_PLUGIN)
    results: list[dict[str, Any]] = []
    ok = False
    try:
        with _signals_raise():
            for backend, label in [(b, size) for b in backends for size in sizes]:
                model = f"{plugin}:build" if backend == "torch" else "mlp"
                hidden = HIDDEN[label]
                params = mlp_params(hidden)
                console.print(f"[bold]{backend} MLP, {params:,} parameters[/] (hidden {hidden})")
                tls = tls_throughput(4 * params)
                mbps = tls["bytes_per_s"] / 1e6
                console.print(f"  TLS transport {mbps:,.0f} MB/s; {NODES} nodes")
                result = run_size(f"{backend}-{label}", hidden, workdir, args, model)
                result["backend"] = backend
                result["tls"] = tls
                results.append(result)
                m = result["median"]
                console.print(
                    f"  round {m['round_s']:.2f} s (train {m['train_s']:.2f}, wait "
                    f"{m['network_s']:.2f}, network {m['network_est_s']:.2f}), RTT round max "
                    f"{_f(result['heartbeat']['rtt_ms_round']['max'], '.1f')} ms"
                )
        ok = True
    finally:
        if args.keep or not ok:
            console.print(f"node data dirs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_tables(results, args.epochs)
    report = {
        "benchmark": "bench_model_size",
        "command": " ".join(["python", "benchmarks/bench_model_size.py", *sys.argv[1:]]),
        "backends": backends,
        "threads_per_node": args.threads or "library default",
        "nodes": NODES,
        "epochs": args.epochs,
        "heartbeat_interval": args.heartbeat_interval,
        "quick": args.quick,
        "sizes": list(sizes),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
