"""Memory of long-lived nodes while a peer restarts over and over (a fast, small soak).

Run: python benchmarks/churn_memory.py [--minutes 4] [--period 6] [--load 1]

Three real nodes (TLS on 127.0.0.1, MLP on digits, unbounded rounds) run in this
process; a fourth runs in a child process that is SIGKILLed and started again every
`--period` seconds. Every 30 s (after `gc.collect()` and `malloc_trim(0)`) it samples
the process's RSS, glibc's bytes in use (`mallinfo2`), Python's allocated blocks, and
the object types whose counts grew most. `--load N` runs N extra copies of the same
experiment at once: memory problems that only show when the machine is busy (a worker
that falls behind, as the records queue did) need that.

What it told us (issue 12): with `--load 1` before 4756f58, RSS grew 1.5-2.5 MiB per
restart and malloc's bytes in use doubled in a minute while Python's traced heap
looked flat: records (evaluation, metrics line, checkpoint, each holding a model copy)
queued faster than one worker thread wrote them. Results go to
benchmarks/results/churn_memory.json.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

import p2pfl
from p2pfl.scenario.processes import free_ports

CHILD = (
    "import json, sys, trio, p2pfl\n"
    "async def main():\n"
    "    async with p2pfl.open_node(**json.loads(sys.argv[1])):\n"
    "        await trio.sleep_forever()\n"
    "trio.run(main)\n"
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        )
    ]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


def _rss_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


async def experiment(minutes: float, period: float, workdir: str) -> dict[str, Any]:
    addrs = [f"127.0.0.1:{p}" for p in free_ports(4)]

    def config(i: int) -> dict[str, Any]:
        return {
            "data_dir": f"{workdir}/n{i}",
            "listen": addrs[i],
            "peers": [a for j, a in enumerate(addrs) if j != i],
            "mdns": False,
            "peer_exchange": False,
            "rounds": 0,
            "min_peers": 1,
            "dataset": "digits",
            "nodes": 4,
            "node_index": i,
            "model": "mlp",
            "hidden": 64,
            "round_timeout": 5.0,
        }

    libc = _libc()
    samples: list[dict[str, Any]] = []
    before: collections.Counter[str] | None = None
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(p2pfl.open_node(**config(i))) for i in range(3)]
        started = time.monotonic()
        restarts, last = 0, -1e9
        while time.monotonic() - started < minutes * 60:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(config(3))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                await trio.sleep(period - 1)
            finally:
                child.kill()
                child.wait()
            restarts += 1
            await trio.sleep(1)
            now = time.monotonic() - started
            if now - last < 30:
                continue
            last = now
            gc.collect()
            if libc is not None:
                libc.malloc_trim(0)
            types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            grew = (
                []
                if before is None
                else sorted(
                    ((k, v - before.get(k, 0)) for k, v in types.items()), key=lambda kv: -kv[1]
                )[:5]
            )
            before = types
            info = libc.mallinfo2() if libc is not None else None
            sample = {
                "t_s": round(now, 1),
                "restarts": restarts,
                "round": nodes[0].machine.round,
                "rss_kib": _rss_kib(),
                "malloc_in_use_kib": None if info is None else info.uordblks >> 10,
                "python_blocks": sys.getallocatedblocks(),
                "types_grown": grew,
            }
            samples.append(sample)
            print(
                f"{sample['t_s']:6.0f} s  restarts {restarts:3d}  round {sample['round']:5d}  "
                f"RSS {sample['rss_kib']} KiB  malloc in use {sample['malloc_in_use_kib']} KiB  "
                f"blocks {sample['python_blocks']}",
                flush=True,
            )
    return {"samples": samples}


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth per restart from the second sample on (the first includes warm-up)."""
    if len(samples) < 3:
        return {}
    a, b = samples[1], samples[-1]
    n = max(1, b["restarts"] - a["restarts"])
    out: dict[str, Any] = {"restarts": n}
    for key in ("rss_kib", "malloc_in_use_kib", "python_blocks"):
        if a[key] is not None and b[key] is not None:
            out[f"{key}_per_restart"] = round((b[key] - a[key]) / n, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--period", type=float, default=6.0, help="seconds between kills")
    parser.add_argument("--load", type=int, default=0, help="extra copies run at once")
    parser.add_argument("--out", default="benchmarks/results/churn_memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = []
    if not args.child:
        for _ in range(args.load):
            cmd = [sys.executable, __file__, "--child", "--minutes", str(args.minutes)]
            cmd += ["--period", str(args.period)]
            extra.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    try:
        with tempfile.TemporaryDirectory(prefix="p2pfl-churn-") as workdir:
            result = trio.run(experiment, args.minutes, args.period, workdir)
    finally:
        for proc in extra:
            proc.kill()
            proc.wait()
    if args.child:
        return
    summary = summarize(result["samples"])
    doc = {
        "benchmark": "churn_memory",
        "command": " ".join(["python", "benchmarks/churn_memory.py", *sys.argv[1:]]),
        "settings": {"minutes": args.minutes, "period": args.period, "load": args.load},
        "cpus": os.cpu_count(),
        "summary": summary,
        **result,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
