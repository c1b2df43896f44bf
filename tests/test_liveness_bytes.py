"""Liveness comes from bytes, not only from whole messages.

A 40 MB update on a slow link can take longer than the heartbeat timeout to arrive;
while it arrives its sender sends nothing else, so judged by whole messages it looked
dead and was cut off (seen in benchmarks/bench_model_size.py at 1e7 parameters).
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing
from test_resource_bounds import PEERS, MiB, closed_by_node, raw_peer, tls_node

from p2pfl.wire.framing import frame_header


async def test_a_large_frame_still_arriving_keeps_its_sender_alive(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    node = tls_node(
        tmp_path,
        heartbeat_interval=1.0,
        heartbeat_timeout=3.0,
        max_frame_size=16 * MiB,
        frame_timeout=60.0,
    )
    closed = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        (address,) = node.listen_addresses
        stream = await raw_peer(PEERS[0], address)

        async def watch() -> None:
            await closed_by_node(stream)
            closed.set()

        nursery.start_soon(watch)
        await stream.send_all(frame_header(8 * MiB))
        for _ in range(10):  # 10 s of a slow frame: 3x the heartbeat timeout
            await stream.send_all(b"\x00" * 65536)
            await trio.sleep(1.0)
        assert not closed.is_set()
        assert node.counters["heartbeat_failures"] == 0
        # Then silence: now it is cut off as before.
        with trio.fail_after(10):
            await closed.wait()
        assert node.counters["heartbeat_failures"] == 1
        await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()
