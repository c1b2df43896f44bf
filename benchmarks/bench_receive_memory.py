"""Issue 12, reproduction 4, against a real `p2pfl node` process: node memory under
admitted peers that announce huge frames and send part of them.

Run: python benchmarks/bench_receive_memory.py [--announce-mib 250] [--send-mib 120]
     [--peers 4] [-- NODE FLAGS...]

Four peers with valid identities complete mutual TLS with a node on 127.0.0.1, each
announces a 250 MiB frame and sends 120 MiB of it (for at most 20 s), then they close.
Printed: what each peer got to send, and the node's VmRSS at start, at its peak while
the peers send, and 3 s after they closed. Node flags after `--` (e.g.
`-- --max-frame-size 268435456`) reproduce an operator who raised the frame limit.
Linux only (/proc). Loopback only.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from p2pfl.identity import Identity
from p2pfl.transport.tcp import ACCEPT
from p2pfl.transport.tls import make_ssl_context
from p2pfl.wire.framing import frame_header

MiB = 1024 * 1024


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def attacker(
    seed: int, port: int, announce: int, send: int, sent: dict[int, int]
) -> trio.SSLStream[trio.SocketStream]:
    identity = Identity.from_seed(bytes([0x40 + seed]) * 32)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    context = make_ssl_context(identity, "default", None, server=False)
    stream = trio.SSLStream(tcp, context, server_side=False)
    await stream.do_handshake()
    if await stream.receive_some(1) != ACCEPT:
        raise RuntimeError("the node did not admit us")
    chunk = b"\0" * MiB
    sent[seed] = 0
    try:
        await stream.send_all(frame_header(announce))
        with trio.move_on_after(20):  # peers the node does not read from stay blocked
            while sent[seed] < send:
                await stream.send_all(chunk)
                sent[seed] += MiB
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the node hung up on us
    return stream


async def attack(pid: int, port: int, peers: int, announce: int, send: int) -> dict[str, object]:
    sent: dict[int, int] = {}
    streams: list[trio.SSLStream[trio.SocketStream]] = []
    peak = rss_mib(pid)

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib(pid))
            await trio.sleep(0.05)

    async def one(i: int) -> None:
        streams.append(await attacker(i, port, announce, send, sent))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as group:
            for i in range(peers):
                group.start_soon(one, i)
        for stream in streams:
            await trio.aclose_forcefully(stream)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    return {"sent_mib": [sent[i] // MiB for i in sorted(sent)], "peak": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--announce-mib", type=int, default=250)
    parser.add_argument("--send-mib", type=int, default=120)
    parser.add_argument("node_flags", nargs="*", help="extra `p2pfl node` flags (after --)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        node = subprocess.Popen(
            [
                *(sys.executable, "-m", "p2pfl", "node", "--no-mdns", "--rounds", "0"),
                *("--data-dir", data_dir, "--listen", f"127.0.0.1:{port}"),
                *("--heartbeat-timeout", "60", "--log-level", "warning", *args.node_flags),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait until the node accepts
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.2)
            time.sleep(1)
            start = rss_mib(node.pid)
            result = trio.run(
                attack, node.pid, port, args.peers, args.announce_mib * MiB, args.send_mib * MiB
            )
            after = rss_mib(node.pid)
        finally:
            node.terminate()
            node.communicate(timeout=30)
    flags = " ".join(args.node_flags) or "(defaults)"
    print(
        f"node flags {flags}: {args.peers} peers announced {args.announce_mib} MiB, "
        f"sent (MiB) {result['sent_mib']}; node RSS MiB: start {start}, "
        f"peak {result['peak']}, 3 s after the peers closed {after}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
