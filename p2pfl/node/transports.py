"""The node's transport: TCP with mutual TLS (and an optional shared secret), maybe
wrapped for fault injection, its resource bounds sized to the model.

Wiring only, done once at construction: the daemon picks the transport, the mesh bounds
it and then only dials and serves through it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.identity import Identity
from p2pfl.logs import redact
from p2pfl.transport.base import Transport, TransportLimits
from p2pfl.wire import codec

log = logging.getLogger("p2pfl.node")


def read_secret(config: NodeConfig) -> bytes | None:
    """The federation's shared secret, if any (checked before the data dir is made)."""
    if config.secret_file is None:
        return None
    try:
        secret = Path(config.secret_file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            "secret_file", f"cannot read {config.secret_file}: {exc.strerror}"
        ) from None
    redact(secret)  # masked in every log line from now on, should it ever reach one
    return secret


def tcp_transport(
    config: NodeConfig, identity: Identity, secret: bytes | None, counters: Counter[str]
) -> Transport:
    from p2pfl.transport.tcp import TcpTransport, parse_address

    host, port = parse_address(config.listen)
    return TcpTransport(
        identity,
        federation=config.federation,
        secret=secret,
        host=host,
        port=port,
        # Refusals by a resource bound (e.g. "inbound_refused") show in status.
        on_event=lambda name: counters.update((name,)),
    )


def faulty_transport(
    inner: Transport,
    plan_file: Path,
    *,
    local_id: str,
    current_round: Callable[[], int],
    seed: int,
) -> Transport:
    from p2pfl.transport.faults import FaultyTransport, load_fault_plan

    log.warning("fault injection active from %s", plan_file)
    return FaultyTransport(
        inner,
        load_fault_plan(plan_file),
        local_id=local_id,
        current_round=current_round,
        seed=seed,
    )


def bound_transport(transport: Transport, config: NodeConfig, num_params: int) -> codec.Limits:
    """Size the resource bounds to the model, now that it is built: frames of about
    twice its dense update, not 256 MiB whatever the model (docs/security.md)."""
    limits = TransportLimits.from_config(config, num_params)
    transport.set_limits(limits)
    # A TCP node can never dial a peer's 'mem:' address: refuse it at the codec.
    return codec.Limits(
        max_bin_len=limits.max_frame_size,
        memory_addresses=config.listen.startswith("mem:"),
    )
