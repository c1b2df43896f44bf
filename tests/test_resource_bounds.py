"""Memory and time bounds against ADMITTED peers (docs/security.md, "Resource bounds").

In an open federation anyone who reaches the port completes mutual TLS with a valid
identity, so every bound here is exercised by real peers with real identities.
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio

from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.transport.tcp import ACCEPT, parse_address
from p2pfl.transport.tls import make_ssl_context
from p2pfl.wire.framing import frame_header

NODE = Identity.from_seed(b"\x10" * 32)
PEERS = [Identity.from_seed(bytes([0x20 + i]) * 32) for i in range(4)]
MiB = 1024 * 1024


async def raw_peer(
    identity: Identity, address: str, federation: str = "default"
) -> trio.SSLStream[trio.SocketStream]:
    """An admitted peer that writes raw bytes: a valid identity, TLS, nothing else."""
    host, port = parse_address(address)
    stream = await trio.open_tcp_stream(host, port)
    ssl_stream = trio.SSLStream(
        stream, make_ssl_context(identity, federation, None, server=False), server_side=False
    )
    await ssl_stream.do_handshake()
    assert await ssl_stream.receive_some(1) == ACCEPT
    return ssl_stream


async def send_partial_frame(
    stream: trio.SSLStream[trio.SocketStream], announced: int, sent: int
) -> bool:
    """Announce a frame of `announced` bytes and send `sent` of them; False if cut off."""
    chunk = b"\x00" * (256 * 1024)
    try:
        await stream.send_all(frame_header(announced))
        left = sent
        while left > 0:
            await stream.send_all(chunk[: min(left, len(chunk))])
            left -= len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def closed_by_node(stream: trio.SSLStream[trio.SocketStream]) -> bool:
    """Read until the node hangs up (it also sends us hellos and pings meanwhile)."""
    try:
        while await stream.receive_some(64 * 1024):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return True


def tls_node(tmp_path: Path, **fields: object) -> Node:
    config = NodeConfig(
        data_dir=tmp_path / "node",
        listen="127.0.0.1:0",
        mdns=False,
        min_peers=1,
        rounds=0,
        **fields,  # type: ignore[arg-type]
    ).validated()
    return Node(config, identity=NODE, train_in_thread=False, control_socket=False)


# --- the reproduction: four admitted peers each announce a 250 MiB frame ------------------


async def test_four_peers_announcing_huge_frames_are_cut_off_for_a_small_model(
    tmp_path: Path,
) -> None:
    """Issue 12, reproduction 4, with the default configuration. The node's model is
    2.6 KB, so a 250 MiB announcement can only be an attack: refused at the header,
    before a byte of it is buffered (it used to be buffered up to 256 MiB per link)."""
    node = tls_node(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        (address,) = node.listen_addresses
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            peers = [await raw_peer(p, address) for p in PEERS]
            async with trio.open_nursery() as senders:
                for stream in peers:
                    senders.start_soon(send_partial_frame, stream, 250 * MiB, 4 * MiB)
                    senders.start_soon(closed_by_node, stream)
        assert node.frames_rejected["oversize"] == len(PEERS)
        for stream in peers:
            await trio.aclose_forcefully(stream)
        nursery.cancel_scope.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
