"""mDNS discovery: time to a full mesh of 2, 5 and 10 nodes, and time until a cleanly
stopped peer disappears from the others' tables.

Run: python benchmarks/bench_discovery.py [--quick] [--loopback] [--sizes 2 5 10]

Every node is its own process, in its own network namespace on a bridge when this
machine allows it (root + `ip netns`), otherwise all on 127.0.0.1. Two levels:

mDNS alone (`run_mdns` per process, the real zeroconf path), wall clock across processes:
- registered: launch -> the slowest `register_service` returned (interpreter start,
  zeroconf start, three ~250 ms probes, then announcements);
- full mesh: launch -> every node has found every other one;
- mesh after start: full mesh minus the slowest interpreter start (mDNS proper); peers
  are found from the first announcement, before `register_service` returns;
- goodbye seen: SIGINT to one node -> every other one has it removed (goodbye packets).

Real `p2pfl node` processes, read through their control sockets:
- connected mesh: launch -> every node has a TLS connection to every other one, with
  mDNS (no --peer) and, as the baseline in the same run, with bootstrap (every
  address given as --peer, mDNS off);
- gone: SIGTERM to one node -> no other node lists it as connected (its Bye message).

Never binds anything but 127.0.0.1 or addresses inside its own namespaces.
Prints rich tables and writes benchmarks/results/bench_discovery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "bench_discovery.json"
BASE_PORT = 47000


# ---- worker: one run_mdns node ----------------------------------------------------------


def worker(ip: str, port: int, federation: str) -> None:
    import trio

    from p2pfl.discovery.mdns import run_mdns
    from p2pfl.identity import Identity

    peer_id = Identity.generate().peer_id

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)

    async def main() -> None:
        emit("start")  # interpreter up, imports done: the mDNS clock starts here
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                await nursery.start(
                    lambda task_status: run_mdns(
                        peer_id=peer_id,
                        federation=federation,
                        port=port,
                        address=ip,
                        interfaces=[ip],
                        on_found=lambda pid, addr: emit("found", peer=pid, address=addr),
                        on_removed=lambda pid: emit("removed", peer=pid),
                        task_status=task_status,
                    )
                )
                emit("ready", id=peer_id)

    trio.run(main)


# ---- parent -----------------------------------------------------------------------------


class Proc:
    """A worker process whose JSON-lines events are collected by a reader thread."""

    def __init__(self, argv: list[str]) -> None:
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)

    def when(self, event: str, **match: Any) -> float | None:
        """Time of the first `event` whose fields match, or None."""
        with self._lock:
            for e in self.events:
                if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                    return float(e["t"])
        return None

    def peer_id(self) -> str | None:
        with self._lock:
            return next((str(e["id"]) for e in self.events if e["event"] == "ready"), None)

    def found_all(self, peers: set[str]) -> float | None:
        """When this node had found every one of `peers` (None if not yet)."""
        times = [self.when("found", peer=p) for p in peers]
        return None if any(t is None for t in times) else max(t or 0.0 for t in times)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def lab_or_loopback(n: int, use_netns: bool) -> AbstractContextManager[Any]:
    if not use_netns:
        return nullcontext(None)
    from p2pfl.discovery import netns

    return netns.lab(n)


def mdns_run(n: int, use_netns: bool) -> dict[str, Any]:
    """run_mdns alone, one process per node: discovery tables, not connections."""
    federation = "bench-" + secrets.token_hex(4)
    script = str(Path(__file__).resolve())
    with lab_or_loopback(n, use_netns) as net:
        procs: list[Proc] = []
        try:
            t0 = time.time()
            for i in range(n):
                ip = net.addresses[i] if net is not None else "127.0.0.1"
                argv = [sys.executable, script, "--worker", ip, str(BASE_PORT + i), federation]
                procs.append(Proc(net.argv(i, argv) if net is not None else argv))
            if not wait_for(lambda: all(p.peer_id() for p in procs), 60):
                raise RuntimeError("workers did not start")
            ids = [p.peer_id() or "" for p in procs]
            ready = max(p.when("ready") or 0.0 for p in procs)
            start = max(p.when("start") or 0.0 for p in procs)
            pairs = [(p, set(ids) - {ids[i]}) for i, p in enumerate(procs)]
            if not wait_for(lambda: all(p.found_all(w) for p, w in pairs), 60):
                raise RuntimeError("no full mesh within 60 s")
            mesh = max(p.found_all(w) or 0.0 for p, w in pairs)
            t_stop = time.time()
            procs[0].proc.send_signal(signal.SIGINT)
            goodbye = None
            if wait_for(lambda: all(p.when("removed", peer=ids[0]) for p in procs[1:]), 30):
                goodbye = max(p.when("removed", peer=ids[0]) or 0.0 for p in procs[1:]) - t_stop
        finally:
            for p in procs:
                stop_process(p.proc)
    return {
        "ready_s": ready - t0,
        "mesh_s": mesh - t0,
        "mdns_mesh_s": mesh - start,
        "goodbye_s": goodbye,
    }


def node_run(n: int, use_netns: bool, discovery: str, root: Path) -> dict[str, Any]:
    """Real `p2pfl node` processes with `discovery` = "mdns" (no --peer) or "bootstrap"
    (every address as --peer, mDNS off): time to a connected full mesh, and time until
    a SIGTERMed node is no longer connected anywhere."""
    from p2pfl.control.client import ControlError, query

    federation = "bench-" + secrets.token_hex(4)
    with lab_or_loopback(n, use_netns) as net:
        hosts = net.addresses if net is not None else ["127.0.0.1"] * n
        ports = [7470] * n if net is not None else free_ports(n)
        listen = [f"{h}:{p}" for h, p in zip(hosts, ports, strict=True)]
        dirs = [root / f"{discovery}{n}-{secrets.token_hex(3)}-{i}" for i in range(n)]
        procs: list[subprocess.Popen[Any]] = []

        def connected(i: int) -> set[str] | None:
            try:
                st = query(dirs[i] / "control.sock", timeout=2.0)
            except ControlError:
                return None
            return {p["id"] for p in st["peers"] if p["state"] == "connected"}

        try:
            t0 = time.time()
            for i in range(n):
                cmd = [
                    sys.executable, "-m", "p2pfl", "node",
                    "--listen", listen[i], "--federation", federation,
                    "--data-dir", str(dirs[i]), "--nodes", str(n), "--node-index", str(i),
                    "--rounds", "1", "--min-peers", str(n - 1), "--no-peer-exchange",
                    "--log-level", "warning",
                ]  # fmt: skip
                if discovery == "mdns":
                    cmd += ["--mdns-interface", hosts[i]]
                else:
                    cmd += ["--no-mdns", *(f"--peer={a}" for a in listen if a != listen[i])]
                argv = net.argv(i, cmd) if net is not None else cmd
                procs.append(
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            full = lambda: all(len(connected(i) or ()) == n - 1 for i in range(n))  # noqa: E731
            if not wait_for(full, 90, 0.02):
                raise RuntimeError(f"{discovery}: no connected mesh of {n} nodes within 90 s")
            mesh = time.time() - t0
            first = query(dirs[0] / "control.sock")["node"]["id"]
            t_stop = time.time()
            procs[0].send_signal(signal.SIGTERM)
            gone = None

            def left() -> bool:
                tables = [connected(i) for i in range(1, n)]
                return all(t is not None and first not in t for t in tables)

            if wait_for(left, 30, 0.02):
                gone = time.time() - t_stop
        finally:
            for p in procs:
                stop_process(p)
    return {"mesh_s": mesh, "gone_s": gone}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"repetitions": len(runs)}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
        out[key.removesuffix("_s") + "_max_s"] = round(max(values), 3) if values else None
    return out


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition per size")
    parser.add_argument("--loopback", action="store_true", help="never use namespaces")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-nodes", action="store_true", help="mDNS level only")
    args = parser.parse_args()
    if min(args.sizes) < 2:
        parser.error("sizes must be >= 2")

    from rich.console import Console
    from rich.table import Table

    from p2pfl.discovery import netns

    reason = "--loopback given" if args.loopback else netns.unavailable_reason()
    use_netns = reason is None
    mode = "network namespaces on a bridge" if use_netns else f"127.0.0.1 ({reason})"
    reps = 1 if args.quick else args.reps
    mdns_results = []
    node_results = []
    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-") as tmp:
        for n in args.sizes:
            runs = [mdns_run(n, use_netns) for _ in range(reps)]
            mdns_results.append({"nodes": n, **summarize(runs), "runs": runs})
            if args.skip_nodes:
                continue
            row: dict[str, Any] = {"nodes": n}
            for discovery in ("mdns", "bootstrap"):
                runs = [node_run(n, use_netns, discovery, Path(tmp)) for _ in range(reps)]
                row[discovery] = {**summarize(runs), "runs": runs}
            node_results.append(row)

    console = Console()
    table = Table(title=f"mDNS alone ({mode}), median of {reps}")
    for col in ("nodes", "registered s", "full mesh s", "mesh after start s", "goodbye seen s"):
        table.add_column(col, justify="right")
    for r in mdns_results:
        table.add_row(
            str(r["nodes"]),
            fmt(r["ready_s"]),
            fmt(r["mesh_s"]),
            fmt(r["mdns_mesh_s"]),
            fmt(r["goodbye_s"]),
        )
    console.print(table)
    if node_results:
        table = Table(title=f"p2pfl node processes ({mode}), median of {reps}")
        for col in ("nodes", "mesh mdns s", "mesh bootstrap s", "gone mdns s", "gone boot s"):
            table.add_column(col, justify="right")
        for r in node_results:
            table.add_row(
                str(r["nodes"]),
                fmt(r["mdns"]["mesh_s"]),
                fmt(r["bootstrap"]["mesh_s"]),
                fmt(r["mdns"]["gone_s"]),
                fmt(r["bootstrap"]["gone_s"]),
            )
        console.print(table)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_discovery",
        "mode": "netns" if use_netns else "loopback",
        "why_not_netns": reason,
        "repetitions": reps,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mdns_only": mdns_results,
        "nodes": node_results,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
