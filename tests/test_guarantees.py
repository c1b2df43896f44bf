"""Guarantees the docs promise, each pinned by a test that fails when it is broken.

Every test here was checked against a deliberate break of the guarantee (named in its
docstring): with the break in place the test fails, without it the test passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.x509.oid import NameOID

from p2pfl.aggregation.registry import RULE_NAMES, make_rule
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.protocol import Aggregated
from p2pfl.transport.base import Connection, HandshakeError
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from p2pfl.transport.tcp import TcpTransport
from p2pfl.transport.tls import build_context, federation_ca, node_certificate

# --- 1. a peer id is the hash of the key a peer proves, never the name it claims -------

HONEST = Identity.from_seed(b"\x11" * 32)
VICTIM = Identity.from_seed(b"\x22" * 32)
ATTACKER = Identity.from_seed(b"\x33" * 32)
OPEN_FEDERATION = "guarantees-open"


def _impostor_certificate() -> x509.Certificate:
    """What any member of an open federation can mint: the CA key derives from the public
    name, so the attacker signs a certificate for its OWN key whose CN is the victim's id."""
    ca = federation_ca(OPEN_FEDERATION, None)
    genuine = node_certificate(ATTACKER, ca)
    claim = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, VICTIM.peer_id)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(claim)
        .issuer_name(ca.cert.subject)
        .public_key(ATTACKER.private_key.public_key())
        .serial_number(genuine.serial_number)
        .not_valid_before(genuine.not_valid_before_utc)
        .not_valid_after(genuine.not_valid_after_utc)
    )
    for ext in genuine.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    cert = builder.sign(ca.key, None)
    cert.verify_directly_issued_by(ca.cert)  # a valid member certificate, not a malformed one
    return cert


def _impostor_transport() -> TcpTransport:
    transport = TcpTransport(ATTACKER, federation=OPEN_FEDERATION)
    ca = federation_ca(OPEN_FEDERATION, None)
    cert = _impostor_certificate()
    transport._client_context = build_context(ATTACKER, ca, cert, server=False)
    transport._server_context = build_context(ATTACKER, ca, cert, server=True)
    return transport


async def test_a_certificate_claiming_another_id_authenticates_its_key_not_its_name() -> None:
    """Catches: `transport/tls.py` `peer_id_of` returning the certificate's CN instead of the
    hash of its key (then the listener sees the victim's id, and the pinned dial succeeds)."""
    seen: list[str] = []

    async def record(conn: Connection) -> None:
        seen.append(conn.peer_id)
        await conn.send(b"ok")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        # The attacker dials an honest listener pretending to be the victim.
        honest = TcpTransport(HONEST, federation=OPEN_FEDERATION)
        (honest_address,) = await nursery.start(honest.listen, record)
        conn = await _impostor_transport().connect(honest_address, HONEST.peer_id)
        assert await conn.receive() == b"ok"
        assert seen == [ATTACKER.peer_id]
        assert VICTIM.peer_id not in seen
        await conn.aclose()

        # The attacker listens where the victim is expected: a dial pinned to the
        # victim's id refuses it, and an unpinned dial learns the attacker's real id.
        (impostor_address,) = await nursery.start(_impostor_transport().listen, record)
        dialer = TcpTransport(HONEST, federation=OPEN_FEDERATION)
        with pytest.raises(HandshakeError, match=f"proved id {ATTACKER.peer_id}"):
            await dialer.connect(impostor_address, expected_peer_id=VICTIM.peer_id)
        unpinned = await dialer.connect(impostor_address)
        assert unpinned.peer_id == ATTACKER.peer_id
        await unpinned.aclose()
        nursery.cancel_scope.cancel()


# --- 2. the allow list admits only the listed ids -------------------------------------


def _node(tmp: Path, network: MemoryNetwork, index: int, peers: list[int], **fields: Any) -> Node:
    cfg = NodeConfig(
        data_dir=tmp / f"n{index}",
        listen=f"mem:n{index}",
        peers=tuple(f"mem:n{j}" for j in peers),
        nodes=3,
        node_index=index,
        mdns=False,
        heartbeat_interval=1.0,
        heartbeat_timeout=5.0,
        **fields,
    ).validated()
    ident = Identity.from_seed(bytes([index + 1]) * 32)
    return Node(
        cfg,
        identity=ident,
        transport=MemoryTransport(network, ident, f"mem:n{index}"),
        train_in_thread=False,
        control_socket=False,
    )


async def test_allow_list_refuses_an_unlisted_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Catches: the allow-list check in `node/connections.py` `_serve` disabled (then the unlisted
    peer connects, is counted as heard and its updates are aggregated)."""
    network = MemoryNetwork()
    allowed_id = Identity.from_seed(bytes([2]) * 32).peer_id
    unlisted_id = Identity.from_seed(bytes([3]) * 32).peer_id
    # Node 0 admits only node 1; node 2 dials node 0 directly (and node 0 dials it, having
    # it in its peers list and hearing of it by peer exchange).
    common: dict[str, Any] = {"rounds": 3, "min_peers": 1, "round_timeout": 20.0}
    gate = _node(tmp_path, network, 0, [1, 2], allow=(allowed_id,), **common)
    allowed = _node(tmp_path, network, 1, [0, 2], **common)
    unlisted = _node(tmp_path, network, 2, [0, 1], **common)
    senders: list[tuple[str, ...]] = []
    connected_ever: set[str] = set()
    aggregated = gate._on_aggregated

    def spy(agg: Aggregated) -> None:
        senders.append(agg.senders)
        connected_ever.update(gate.peers.connected_ids())
        aggregated(agg)

    gate._on_aggregated = spy  # type: ignore[method-assign]
    nodes = [gate, allowed, unlisted]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        for node in nodes:
            await node.done.wait()
        nursery.cancel_scope.cancel()

    assert senders == [(allowed_id,)] * 3  # every round heard node 1, never node 2
    assert unlisted_id not in connected_ever
    assert not gate.peers.is_connected(unlisted_id)
    assert gate.counters["not_admitted"] >= 1
    # The refused peer still trained with the admitted one: refusal is per node.
    assert all(row["peers_heard"] >= 1 for row in unlisted.history)


# --- 3. robust rules give a claimed sample count no influence --------------------------

ROBUST = [name for name in RULE_NAMES if name != "mean"]


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(0.0, 1.0, size=(9, 40)).astype(np.float32)
    x[8] += 25.0  # one outlier, so robust rules have something to reject
    return x, x[0].copy()


def _aggregate(name: str, f: int, options: dict[str, Any], weights: np.ndarray) -> np.ndarray:
    x, own = _inputs()
    rule = make_rule(name, f=f, options=options)  # fresh: bucketing's generator restarts
    return rule(x, weights, own)


@pytest.mark.parametrize("claimer", [1, 3, 8])
@pytest.mark.parametrize(
    ("name", "f", "options"),
    [pytest.param(name, f, {}, id=f"{name}-f{f}") for name in ROBUST for f in (0, 2)]
    + [
        pytest.param("multi_krum", 1, {"m": 3}, id="multi_krum-m3"),
        pytest.param("trimmed_mean", 0, {"beta": 0.2}, id="trimmed_mean-beta"),
    ]
    + [pytest.param(name, 1, {"bucket_size": 2}, id=f"{name}-bucketed") for name in ROBUST],
)
def test_robust_rules_ignore_claimed_sample_counts(
    name: str, f: int, options: dict[str, Any], claimer: int
) -> None:
    """Catches: a robust rule weighting by claimed counts (e.g. Multi-Krum averaging its
    chosen inputs weighted by their counts): one input claiming 2**31 samples must move
    the aggregate exactly as much as claiming 1, i.e. not at all."""
    base = np.full(9, 100.0)
    huge, tiny = base.copy(), base.copy()
    huge[claimer] = 2.0**31
    tiny[claimer] = 1.0
    reference = _aggregate(name, f, options, base)
    assert np.isfinite(reference).all()
    np.testing.assert_array_equal(_aggregate(name, f, options, huge), reference)
    np.testing.assert_array_equal(_aggregate(name, f, options, tiny), reference)


def test_the_plain_mean_does_weight_by_claims() -> None:
    """The control: the parameters above can expose weighting (the mean, which is meant
    to weight, moves when one input claims more)."""
    base = np.full(9, 100.0)
    huge = base.copy()
    huge[1] = 2.0**31
    assert not np.array_equal(_aggregate("mean", 0, {}, huge), _aggregate("mean", 0, {}, base))
