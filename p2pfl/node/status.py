"""The node's status: one JSON-able snapshot of the daemon and its parts.

`p2pfl status` (over the control socket), scenario reports and tests read it. It only
reads, so it lives apart from the daemon that it describes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from p2pfl import PROTOCOL_VERSION, __version__
from p2pfl.protocol import Phase

if TYPE_CHECKING:  # the daemon calls us; we only need its type
    from p2pfl.node.daemon import Node


def node_status(node: Node) -> dict[str, Any]:
    now = trio.current_time()
    params = node.machine.params
    return {
        "node": {
            "id": node.id,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "listen": node.mesh.listen_addresses,
            "federation": node.config.federation,
            "uptime_s": round(now - node.started_at, 3),
            "pid": os.getpid(),
            "data_dir": str(node.data_dir),
            "role": node.role,
            "index": node.config.node_index,
        },
        "round": {
            "current": node.machine.round,
            # "done" once the last round's metrics and checkpoint are written, not when
            # the round machine stops: a reader may stop the node as soon as it sees it.
            "phase": "done"
            if node.done.is_set()
            else "finishing"
            if node.machine.phase is Phase.DONE
            else str(node.machine.phase),
            "target": node.config.rounds or None,
            # "async": no barrier; `current` is then the model's version (protocol/gossip.py).
            "mode": node.config.mode,
            "heard": len(node.machine.received_this_round),
            "expected": node.machine.expected_this_round,
        },
        "model": {
            "name": node.learner.model_name,
            "version": node.machine.round,
            "hash": _params_hash(params),
            "params": int(params.size),
        },
        "last_aggregation": node.last_aggregation,
        "robustness": robustness_status(node),
        "compression": None
        if not node.outbox.compressing
        else {
            "pipeline": list(node.config.compression),
            "raw_bytes": node.outbox.last_sizes[0],
            "wire_bytes": node.outbox.last_sizes[1],
            "ratio": round(node.outbox.last_sizes[0] / max(1, node.outbox.last_sizes[1]), 2),
        },
        "secure": None if node.secure is None else node.secure.status(),
        "privacy": None if node.learner.privacy is None else node.learner.privacy.status(),
        "privacy_examples": None if node.learner.dp_sgd is None else node.learner.dp_sgd.status(),
        "participation": None
        if node.learner.participation is None
        else node.learner.participation.status(),
        "event_loop": None if node.loopwatch is None else node.loopwatch.status(),
        "records": node.learner.records_status(),
        "memory": memory_status(),
        "history": list(node.history),  # bounded: the learner keeps the last rows
        "peers": node.peers.snapshot(now),
        "dial_targets": node.peers.dial_status(now),
        "inbound_failures": inbound_failures(node.transport, now),
        "counters": {
            "faults_injected": dict(counts())
            if callable(counts := getattr(node.transport, "counts", None))
            else None,
            "frames_rejected": dict(node.mesh.frames_rejected),
            "contained_errors": dict(node.supervisor.contained),
            "reconnects": node.counters["reconnects"],
            "timeouts": node.counters["timeouts"],
            "bytes_sent": node.mesh.bytes_sent,
            "bytes_received": node.mesh.bytes_received,
            **{k: v for k, v in node.counters.items() if k not in ("reconnects", "timeouts")},
        },
    }


def inbound_failures(transport: object, now: float) -> list[dict[str, Any]]:
    """Hosts whose inbound handshakes failed, with the last reason (a TCP transport
    keeps them; a fault-injecting wrapper is looked through; in-memory has none)."""
    transport = getattr(transport, "inner", transport)
    failures = getattr(transport, "handshake_failures", None)
    return [] if failures is None else failures.snapshot(now)


def robustness_status(node: Node) -> dict[str, Any]:
    """The rule as configured (`need`: inputs it needs to outvote f), its fallbacks and
    guards counted by reason since start, and each neighbour's suspicion score."""
    rule = node.machine.rule
    return {
        "rule": getattr(rule, "name", node.config.aggregation),
        "f": node.config.tolerate,
        "need": getattr(rule, "need", None),
        **node.ledger.status(),
    }


_last_hash: tuple[np.ndarray | None, str] = (None, "")


def _params_hash(params: np.ndarray) -> str:
    """The model's hash, computed once per model: the round machine replaces its
    parameter array when the model changes and never mutates it, and hashing 40 MB on
    every status poll cost a large node its event loop's time."""
    global _last_hash
    if _last_hash[0] is not params:
        _last_hash = (params, hashlib.sha256(params.tobytes()).hexdigest()[:16])
    return _last_hash[1]


def memory_status() -> dict[str, int | None]:
    """The process's memory, to tell a leak of Python objects (blocks grow) from native
    or allocator growth (RSS grows, blocks flat). Process-wide: in-process nodes share it."""
    rss = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
    except OSError:  # not Linux
        pass
    return {
        "rss_bytes": rss,
        "python_blocks": sys.getallocatedblocks(),
        "threads": threading.active_count(),
    }
