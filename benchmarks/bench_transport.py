"""Transport throughput: one 40 MB payload (10M float32) over loopback, TLS vs plain TCP.

Run: python benchmarks/bench_transport.py [--quick] [--mode both|processes|inprocess]

Three ways to move the same bytes over 127.0.0.1, timed from the first send until the
receiver holds the whole payload as one buffer (and, between processes, its 1-byte ack
is back), interleaved so load changes hit every method alike:
- plain TCP: trio SocketStream, send_all / receive_some in 256 KiB, chunks joined once
  (the baseline: no framing, no encryption);
- raw TLS: trio.SSLStream with the p2pfl contexts, no framing (trio's TLS as it comes);
- TcpTransport: the real thing (TLS 1.3 + length-prefixed parts + budget + deadlines).
Two modes, each with its own plain-TCP baseline in the same run:
- processes (the headline): sender and receiver are two processes, as two nodes are,
  so encryption and decryption run on the machine's two cores at once;
- inprocess: both ends in one trio loop on one core, encryption and decryption add up.
Also times a full connect (TCP + TLS 1.3 handshake + accept byte).
Prints a rich table per mode and writes benchmarks/results/bench_transport.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import platform
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio
from rich.console import Console
from rich.table import Table

from p2pfl.identity import Identity
from p2pfl.transport.base import Connection
from p2pfl.transport.tcp import TcpTransport, parse_address
from p2pfl.transport.tls import make_ssl_context

RESULTS = Path(__file__).resolve().parent / "results" / "bench_transport.json"
CHUNK = 256 * 1024

Sender = Callable[[bytes], Awaitable[bytes]]  # send one payload, return what arrived


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        data = await stream.receive_some(CHUNK)
        if not data:
            raise EOFError("peer closed early")
        chunks.append(bytes(data))
        got += len(data)
    return b"".join(chunks)


async def _stream_pair(
    nursery: trio.Nursery,
    wrap_server: Callable[[trio.SocketStream], trio.abc.Stream],
    wrap_client: Callable[[trio.SocketStream], trio.abc.Stream],
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: trio.MemorySendChannel[trio.abc.Stream]
    accepted, incoming = trio.open_memory_channel[trio.abc.Stream](1)

    async def accept() -> None:
        stream = await listeners[0].accept()
        await accepted.send(wrap_server(stream))
        await listeners[0].aclose()

    nursery.start_soon(accept)
    client = wrap_client(await trio.open_tcp_stream("127.0.0.1", port))
    server = await incoming.receive()
    return server, client


def _stream_sender(
    nursery: trio.Nursery, server: trio.abc.Stream, client: trio.abc.Stream
) -> Sender:
    async def send(payload: bytes) -> bytes:
        result: list[bytes] = []

        async def receive() -> None:
            result.append(await _receive_exactly(server, len(payload)))

        async with trio.open_nursery() as inner:
            inner.start_soon(receive)
            await client.send_all(payload)
        return result[0]

    return send


async def plain_tcp(nursery: trio.Nursery) -> Sender:
    server, client = await _stream_pair(nursery, lambda s: s, lambda s: s)
    return _stream_sender(nursery, server, client)


async def raw_tls(nursery: trio.Nursery, a: Identity, b: Identity) -> Sender:
    sctx = make_ssl_context(a, "bench", None, server=True)
    cctx = make_ssl_context(b, "bench", None, server=False)
    server, client = await _stream_pair(
        nursery,
        lambda s: trio.SSLStream(s, sctx, server_side=True),
        lambda s: trio.SSLStream(s, cctx),
    )
    assert isinstance(server, trio.SSLStream) and isinstance(client, trio.SSLStream)
    async with trio.open_nursery() as hs:
        hs.start_soon(server.do_handshake)
        hs.start_soon(client.do_handshake)
    return _stream_sender(nursery, server, client)


async def transport(nursery: trio.Nursery, a: Identity, b: Identity) -> tuple[Sender, str]:
    server_t, client_t = TcpTransport(a, federation="bench"), TcpTransport(b, federation="bench")
    inbox_send, inbox = trio.open_memory_channel[bytes](1)

    async def handler(conn: Connection) -> None:
        while True:
            await inbox_send.send(await conn.receive())

    (address,) = await nursery.start(server_t.listen, handler)
    conn = await client_t.connect(address, expected_peer_id=a.peer_id)

    async def send(payload: bytes) -> bytes:
        await conn.send(payload)
        return await inbox.receive()

    return send, address


async def time_connects(address: str, b: Identity, a: Identity, reps: int) -> list[float]:
    client_t = TcpTransport(b, federation="bench")
    parse_address(address)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        conn = await client_t.connect(address, expected_peer_id=a.peer_id)
        times.append(time.perf_counter() - start)
        await conn.aclose()
    return times


async def run(n_floats: int, reps: int) -> dict[str, Any]:
    payload = np.random.default_rng(0).standard_normal(n_floats, dtype=np.float32).tobytes()
    a, b = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
    async with trio.open_nursery() as nursery:
        tsend, address = await transport(nursery, a, b)
        senders: dict[str, Sender] = {
            "plain TCP": await plain_tcp(nursery),
            "raw TLS": await raw_tls(nursery, a, b),
            "TcpTransport": tsend,
        }
        result = await _time_senders(senders, payload, reps)
        connect_times = await time_connects(address, b, a, max(reps, 5))
        nursery.cancel_scope.cancel()
    return {
        **result,
        "connect_median_ms": statistics.median(connect_times) * 1e3,
        "connect_samples_ms": [t * 1e3 for t in connect_times],
    }


async def _time_senders(senders: dict[str, Sender], payload: bytes, reps: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in senders}
    for name, send in senders.items():  # warm-up, and check the bytes arrive intact
        if await send(payload) != payload:
            raise AssertionError(f"{name}: payload corrupted")
    for _ in range(reps):  # interleaved, so load changes hit every method alike
        for name, send in senders.items():
            gc.collect()
            start = time.perf_counter()
            await send(payload)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain TCP"])
    rows = []
    for name, samples in times.items():
        med = statistics.median(samples)
        rows.append(
            {
                "method": name,
                "median_s": med,
                "mb_per_s": len(payload) / med / 1e6,
                "ratio_vs_plain_tcp": base / med,
                "samples_s": samples,
            }
        )
    return {"payload_bytes": len(payload), "rows": rows}


# --- two processes ---------------------------------------------------------------


def _payload(n_floats: int) -> bytes:
    return np.random.default_rng(0).standard_normal(n_floats, dtype=np.float32).tobytes()


def _identities() -> tuple[Identity, Identity]:
    return Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)


async def _receiver(pipe: Any, n_floats: int) -> None:
    """The receiving process: three listeners; acks each payload with one byte (b"k",
    or b"x" if the first one arrived corrupted)."""
    expected = _payload(n_floats)
    a, _ = _identities()
    sctx = make_ssl_context(a, "bench", None, server=True)

    def ack(received: bytes | bytearray, first: list[bool]) -> bytes:
        ok = not first[0] or received == expected  # check the bytes once, untimed
        first[0] = False
        return b"k" if ok else b"x"

    async def serve_stream(stream: trio.abc.Stream) -> None:
        first = [True]
        while True:
            data = await _receive_exactly(stream, len(expected))
            await stream.send_all(ack(data, first))

    async def serve_plain(stream: trio.SocketStream) -> None:
        await serve_stream(stream)

    async def serve_tls(stream: trio.SocketStream) -> None:
        await serve_stream(trio.SSLStream(stream, sctx, server_side=True))

    async def handler(conn: Connection) -> None:
        first = [True]
        while True:
            await conn.send(ack(await conn.receive(), first))

    async with trio.open_nursery() as nursery:
        plain = await nursery.start(trio.serve_tcp, serve_plain, 0)
        tls = await nursery.start(trio.serve_tcp, serve_tls, 0)
        server_t = TcpTransport(a, federation="bench")
        (address,) = await nursery.start(server_t.listen, handler)
        pipe.send(
            {
                "plain": plain[0].socket.getsockname()[1],
                "tls": tls[0].socket.getsockname()[1],
                "transport": address,
            }
        )


def _receiver_main(pipe: Any, n_floats: int) -> None:
    trio.run(_receiver, pipe, n_floats)


def _acked(send: Callable[[bytes], Awaitable[None]], ack: Callable[[], Awaitable[bytes]]) -> Sender:
    async def round_trip(payload: bytes) -> bytes:
        await send(payload)
        if await ack() != b"k":
            raise AssertionError("the receiver got other bytes")
        return payload

    return round_trip


async def _stream_client(port: int, tls: bool) -> Sender:
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if tls:
        _, b = _identities()
        ssl_stream = trio.SSLStream(stream, make_ssl_context(b, "bench", None, server=False))
        await ssl_stream.do_handshake()
        stream = ssl_stream
    return _acked(stream.send_all, lambda: stream.receive_some(1))


async def run_processes(ports: dict[str, Any], n_floats: int, reps: int) -> dict[str, Any]:
    payload = _payload(n_floats)
    a, b = _identities()
    conn = await TcpTransport(b, federation="bench").connect(
        ports["transport"], expected_peer_id=a.peer_id
    )
    senders: dict[str, Sender] = {
        "plain TCP": await _stream_client(ports["plain"], tls=False),
        "raw TLS": await _stream_client(ports["tls"], tls=True),
        "TcpTransport": _acked(conn.send, conn.receive),
    }
    result = await _time_senders(senders, payload, reps)
    connect_times = await time_connects(ports["transport"], b, a, max(reps, 5))
    await conn.aclose()
    return {
        **result,
        "connect_median_ms": statistics.median(connect_times) * 1e3,
        "connect_samples_ms": [t * 1e3 for t in connect_times],
    }


def two_processes(n_floats: int, reps: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(child, n_floats), daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the receiver process did not start")
        ports = parent.recv()
        return trio.run(run_processes, ports, n_floats, reps)
    finally:
        proc.terminate()
        proc.join(5)


def _print(console: Console, title: str, result: dict[str, Any]) -> None:
    table = Table(title=title)
    for column in ("method", "ms", "MB/s", "throughput vs plain TCP"):
        table.add_column(column, justify="right")
    for r in result["rows"]:
        table.add_row(
            r["method"],
            f"{r['median_s'] * 1e3:.1f}",
            f"{r['mb_per_s']:,.0f}",
            f"{r['ratio_vs_plain_tcp']:.2f}x",
        )
    console.print(table)
    console.print(
        f"TLS connect (TCP + TLS 1.3 handshake + accept byte): "
        f"{result['connect_median_ms']:.2f} ms median"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 9")
    parser.add_argument(
        "--mode",
        choices=("both", "processes", "inprocess"),
        default="both",
        help="two processes (the headline), one trio loop, or both (default)",
    )
    args = parser.parse_args()
    reps = 3 if args.quick else 9
    n_floats = 10_000_000
    mb = 4 * n_floats / 1e6
    console = Console()
    modes: dict[str, Any] = {}
    if args.mode in ("both", "processes"):
        modes["two_processes"] = two_processes(n_floats, reps)
        _print(
            console,
            f"two processes (sender, receiver): {mb:.0f} MB over loopback, median of {reps}",
            modes["two_processes"],
        )
    if args.mode in ("both", "inprocess"):
        modes["one_process"] = trio.run(run, n_floats, reps)
        _print(
            console,
            f"one process, one trio loop: {mb:.0f} MB over loopback, median of {reps}",
            modes["one_process"],
        )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_transport",
        "repetitions": reps,
        "quick": args.quick,
        "python": platform.python_version(),
        "trio": trio.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "machine": platform.machine(),
        "cpus": multiprocessing.cpu_count(),
        "payload_bytes": 4 * n_floats,
        **modes,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
