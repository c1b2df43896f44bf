"""mDNS discovery: time to a full mesh of 2, 5 and 10 nodes, and time until a cleanly
stopped peer disappears from the others' tables.

Run: python benchmarks/bench_discovery.py [--quick] [--loopback] [--sizes 2 5 10]

Each node is its own process running `run_mdns` (the real zeroconf code path), in its
own network namespace on a bridge when this machine allows it (root + `ip netns`),
otherwise all on 127.0.0.1. Times are wall clock across processes (time.time()):
- registered: launch -> the slowest node's `register_service` returned (Python start,
  zeroconf start, three ~250 ms probes, then announcements);
- full mesh: launch -> every node has found every other one (the number that matters);
- mesh after start: full mesh minus the slowest interpreter start-up (mDNS alone);
  peers are found from the first announcement, before `register_service` returns;
- goodbye seen: SIGINT to one node -> every other node has it removed.
Never binds anything but 127.0.0.1 or addresses inside its own namespaces.
Prints a rich table and writes benchmarks/results/bench_discovery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "bench_discovery.json"
BASE_PORT = 47000


# ---- worker (one node) ------------------------------------------------------------------


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
                        emit("stopping")
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
        emit("closed")

    trio.run(main)


# ---- parent -----------------------------------------------------------------------------


class Proc:
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

    def first(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        with self._lock:
            return next((e for e in self.events if pred(e)), None)

    def peer_id(self) -> str | None:
        ready = self.first(lambda e: e["event"] == "ready")
        return None if ready is None else str(ready["id"])

    def found_time(self, peers: set[str]) -> float | None:
        """When this node had found all of `peers` (None if not yet)."""
        with self._lock:
            seen: set[str] = set()
            for e in self.events:
                if e["event"] == "found" and e["peer"] in peers:
                    seen.add(e["peer"])
                    if seen == peers:
                        return float(e["t"])
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def one_run(n: int, use_netns: bool) -> dict[str, Any]:
    federation = "bench-" + secrets.token_hex(4)
    script = str(Path(__file__).resolve())
    ctx: AbstractContextManager[Any]
    if use_netns:
        from p2pfl.discovery import netns

        ctx = netns.lab(n)
    else:
        ctx = nullcontext(None)
    with ctx as net:
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
            ready = [float((p.first(lambda e: e["event"] == "ready") or {})["t"]) for p in procs]
            start = [float((p.first(lambda e: e["event"] == "start") or {})["t"]) for p in procs]
            wanted = [set(ids) - {ids[i]} for i in range(n)]
            if not wait_for(
                lambda: all(p.found_time(w) for p, w in zip(procs, wanted, strict=True)), 60
            ):
                raise RuntimeError("no full mesh within 60 s")
            mesh = max(p.found_time(w) or 0.0 for p, w in zip(procs, wanted, strict=True))
            goodbye = None
            if n >= 2:
                stopped = ids[0]
                t_stop = time.time()
                procs[0].proc.send_signal(signal.SIGINT)

                def gone(p: Proc) -> bool:
                    return (
                        p.first(lambda e: e["event"] == "removed" and e["peer"] == stopped)
                        is not None
                    )

                if wait_for(lambda: all(gone(p) for p in procs[1:]), 30):
                    goodbye = (
                        max(
                            float(
                                (
                                    p.first(
                                        lambda e: e["event"] == "removed" and e["peer"] == stopped
                                    )
                                    or {}
                                )["t"]
                            )
                            for p in procs[1:]
                        )
                        - t_stop
                    )
        finally:
            for p in procs:
                p.stop()
    return {
        "ready_s": max(ready) - t0,
        "mesh_s": mesh - t0,
        "mdns_mesh_s": mesh - max(start),
        "goodbye_s": goodbye,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"repetitions": len(runs)}
    for key in ("ready_s", "mesh_s", "mdns_mesh_s", "goodbye_s"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
        out[key.replace("_s", "_max_s")] = round(max(values), 3) if values else None
    return out


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition per size")
    parser.add_argument("--loopback", action="store_true", help="never use namespaces")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from p2pfl.discovery import netns

    reason = "--loopback given" if args.loopback else netns.unavailable_reason()
    use_netns = reason is None
    mode = "network namespaces on a bridge" if use_netns else f"127.0.0.1 ({reason})"
    reps = 1 if args.quick else args.reps
    results = []
    for n in args.sizes:
        runs = []
        for _ in range(reps):
            runs.append(one_run(n, use_netns))
        results.append({"nodes": n, **summarize(runs), "runs": runs})

    table = Table(title=f"mDNS discovery ({mode}), median of {reps}")
    for col in ("nodes", "registered s", "full mesh s", "mesh after start s", "goodbye seen s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["nodes"]),
            f"{r['ready_s']:.2f}",
            f"{r['mesh_s']:.2f}",
            f"{r['mdns_mesh_s']:.2f}",
            "-" if r["goodbye_s"] is None else f"{r['goodbye_s']:.2f}",
        )
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_discovery",
        "mode": "netns" if use_netns else "loopback",
        "why_not_netns": reason,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
