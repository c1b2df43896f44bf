"""What lets people watch a running node: the control socket (`p2pfl status`) and,
when configured, the Prometheus endpoint. Both only read the node's status snapshot;
started in the node's nursery so they end with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:  # the daemon calls us; we only need its type
    from p2pfl.node.daemon import Node


async def serve_observers(node: Node, nursery: trio.Nursery) -> int | None:
    """Start the control socket (unless the node was built without one) and the metrics
    endpoint (with `metrics_listen`); returns the metrics port (None when off)."""
    if node.control_socket:
        from p2pfl.control.server import serve_control
        from p2pfl.node.daemon import CONTROL_SOCKET

        await nursery.start(
            serve_control, node.data_dir / CONTROL_SOCKET, {"status": lambda _req: node.status()}
        )
    if not node.config.metrics_listen:
        return None
    from p2pfl.node.prometheus import serve_metrics

    port: int = await nursery.start(serve_metrics, node.config.metrics_listen, node.status)
    return port
