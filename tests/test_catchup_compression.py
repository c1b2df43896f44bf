"""A catch-up that ends in the round a node already sent its model for.

A node collecting round N (its model for N is out) sees a peer two rounds ahead and
catches up; the peers it asks are at N or behind (or do not answer), so it stays at N.
It used to train and broadcast round N a second time: peers that had the first model
dropped the second as a duplicate, and with compression the encoder refused the
repeated round (`ValueError: round N is not after the last encoded round N`), which
ended the node. Now it goes back to collecting round N with the model it sent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfl.aggregation import mean
from p2pfl.compression import UpdateDecoder, parse_pipeline
from p2pfl.config import NodeConfig
from p2pfl.identity import Identity
from p2pfl.node import Node
from p2pfl.node.outbox import UpdateOutbox
from p2pfl.protocol import (
    Action,
    Aggregated,
    Broadcast,
    CaughtUp,
    Phase,
    RequestState,
    RequestUpdates,
    RoundMachine,
    RoundSettings,
    Train,
)
from p2pfl.transport.base import Connection, ConnectionClosed
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport
from p2pfl.wire import codec
from p2pfl.wire.messages import (
    CompressedModelUpdate,
    Hello,
    ModelUpdate,
    Ping,
    Pong,
    UpdateRequest,
)

D = 8
PEERS = ["a", "b", "c"]


def full(x: float) -> np.ndarray:
    return np.full(D, x, dtype=np.float32)


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


def collecting_round_one(**kw: Any) -> RoundMachine:
    """A machine that finished round 0 and sent its model for round 1."""
    m = RoundMachine(
        params=full(0.0),
        rule=mean,
        settings=RoundSettings(round_timeout=10.0, catch_up_timeout=4.0, **kw),
    )
    m.start(0.0, PEERS)
    m.trained(0.0, 0, full(1.0), 1, PEERS)
    for p in PEERS:
        m.receive_update(0.5, p, 0, full(1.0), 1)
    assert m.round == 1 and m.phase is Phase.TRAINING
    acts = m.trained(1.0, 1, full(2.0), 1, PEERS)
    assert kinds(acts) == [Broadcast]
    m.receive_update(1.2, "a", 1, full(3.0), 1)
    return m


def finish_catch_up(m: RoundMachine, how: str) -> list[Action]:
    """Make `m` catch up (a peer claims round 3) and end the catch-up at round 1."""
    acts = m.observe_peer_round(2.0, "liar", 3)
    req = next(a for a in acts if isinstance(a, RequestState))
    assert m.phase is Phase.CATCHING_UP and "liar" in req.to
    if how == "same_round":  # the honest peers asked are in round 1 too
        out: list[Action] = []
        for p in req.to:
            out += m.receive_state(2.5, p, 1, full(1.0))
        return out
    if how == "behind":  # one honest peer is still finishing round 0
        m.receive_state(2.5, "liar", 3, full(9.0))
        assert m.receive_state(2.5, "b", 0, full(1.0)) == []  # a majority: a moment more
        return m.tick(3.0)
    if how == "timeout":  # nobody answers
        return m.tick(2.0 + 4.0)
    assert how == "lost"  # the peers asked disconnect
    out = []
    for p in req.to:
        out += m.peer_lost(2.5, p)
    return out


@pytest.mark.parametrize("how", ["same_round", "behind", "timeout", "lost"])
def test_catch_up_to_the_round_already_sent_resumes_collecting(how: str) -> None:
    m = collecting_round_one(nudge_fraction=0.2)
    acts = finish_catch_up(m, how)
    # Neither trained nor sent again: the round's model is out already.
    assert not any(isinstance(a, Train | Broadcast) for a in acts), acts
    assert m.round == 1 and m.phase is Phase.COLLECTING
    # The round goes on: the update that arrived before the catch-up still counts, and
    # the one still missing completes it without a timeout.
    missing = [p for p in ("b", "c") if p not in m.received_this_round]
    if how == "lost":
        missing = [p for p in missing if p in m._waiting_for]
    out: list[Action] = []
    for p in missing:
        out += m.receive_update(3.0, p, 1, full(3.0), 1)
    if not missing:
        out = acts
    agg = next(a for a in [*acts, *out] if isinstance(a, Aggregated))
    assert agg.round == 1 and not agg.timed_out
    assert "a" in agg.senders
    # Own model (2.0) is the one sent, not a second training result.
    np.testing.assert_allclose(agg.params, np.mean([2.0] + [3.0] * len(agg.senders)))
    assert next(a for a in out + acts if isinstance(a, Train)).round == 2


def test_resumed_round_asks_for_the_missing_updates_at_once() -> None:
    m = collecting_round_one(nudge_fraction=0.2)
    finish_catch_up(m, "timeout")  # t = 6: the collection deadline (11) is ahead
    assert m.next_wakeup == 6.0
    acts = m.tick(6.0)
    assert acts == [RequestUpdates(1, ("b", "c"))]


def test_catch_up_past_the_round_sent_still_trains_the_new_round() -> None:
    m = collecting_round_one()
    acts = m.observe_peer_round(2.0, "b", 3)
    req = next(a for a in acts if isinstance(a, RequestState))
    out: list[Action] = []
    for p in req.to:
        out += m.receive_state(2.5, p, 3, full(5.0))
    assert kinds(out) == [CaughtUp, Train]
    assert m.round == 3


def test_catch_up_while_training_still_trains_the_round() -> None:
    m = collecting_round_one()
    m.receive_update(1.5, "b", 1, full(3.0), 1)
    m.receive_update(1.5, "c", 1, full(3.0), 1)
    assert m.round == 2 and m.phase is Phase.TRAINING  # round 2 not sent yet
    m.observe_peer_round(2.0, "liar", 4)
    acts = m.tick(2.0 + 4.0)
    assert kinds(acts) == [Train] and m.round == 2


# ---- the outbox: one model per round on the wire --------------------------------------


def test_outbox_gives_the_same_payloads_for_a_round_sent_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    box = UpdateOutbox("me", parse_pipeline(("delta", "quantize:8")), per_peer=False)
    first = box.payloads(5, full(1.0), 3, PEERS)
    with caplog.at_level(logging.WARNING, logger="p2pfl.node"):
        again = box.payloads(5, full(2.0), 3, PEERS)  # must not raise
    assert again == first
    assert any("round 5" in r.getMessage() for r in caplog.records)
    # The stream goes on with the next round.
    box.payloads(6, full(3.0), 3, PEERS)


# ---- property: whatever happens, one broadcast per round and the encoder keeps up -----

_op = st.one_of(
    st.tuples(st.just("update"), st.integers(0, 2), st.sampled_from([0, 0, 1, 2, 3])),
    st.tuples(st.just("train")),
    st.tuples(st.just("train")),
    st.tuples(st.just("tick"), st.floats(0.0, 6.0)),
    st.tuples(st.just("ahead"), st.integers(0, 2), st.integers(2, 4)),
    st.tuples(st.just("state"), st.integers(0, 2), st.integers(-1, 3)),
    st.tuples(st.just("lost"), st.integers(0, 2)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=60), nudge=st.sampled_from([None, 0.2]))
def test_one_broadcast_per_round_whatever_the_catch_ups(
    ops: list[tuple[Any, ...]], nudge: float | None
) -> None:
    m = RoundMachine(
        params=full(0.0),
        rule=mean,
        settings=RoundSettings(
            target_rounds=0, round_timeout=10.0, catch_up_timeout=5.0, nudge_fraction=nudge
        ),
    )
    box = UpdateOutbox("me", parse_pipeline(("delta", "quantize:8")), per_peer=False)
    receiver = UpdateDecoder(D, max_frame_size=1 << 20)
    sent: list[int] = []
    now = 0.0
    pending: int | None = None

    def handle(acts: list[Action]) -> None:
        nonlocal pending
        for a in acts:
            if isinstance(a, Train):
                pending = a.round
            elif isinstance(a, Broadcast):
                assert a.round not in sent, (a.round, sent)
                sent.append(a.round)
                payload = box.payloads(a.round, a.params, a.samples, ["r"])["r"]
                msg = codec.decode(payload)
                assert isinstance(msg, CompressedModelUpdate)
                receiver.decode("me", msg.round, msg.blob)  # the stream stays decodable

    handle(m.start(now, PEERS))
    for op in ops:
        if op[0] == "update":
            handle(m.receive_update(now, PEERS[op[1]], m.round + op[2], full(1.0), 1))
        elif op[0] == "train" and pending is not None:
            r, pending = pending, None
            handle(m.trained(now, r, full(float(r)), 1, PEERS))
        elif op[0] == "tick":
            now += op[1]
            handle(m.tick(now))
        elif op[0] == "ahead":
            handle(m.observe_peer_round(now, PEERS[op[1]], m.round + op[2]))
        elif op[0] == "state":
            handle(m.receive_state(now, PEERS[op[1]], m.round + op[2], full(1.0)))
        elif op[0] == "lost":
            handle(m.peer_lost(now, PEERS[op[1]]))
    assert sent == sorted(sent)


# ---- a real node: compression, a catch-up to its own round, and it keeps going --------


async def test_a_compressing_node_caught_up_to_its_own_round_keeps_running(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """One node and a scripted peer. While the node collects round 1, the peer claims
    round 3 and ignores the state request: the catch-up ends at round 1, where the
    node's compressed model is already out."""
    network = MemoryNetwork()
    cfg = NodeConfig(
        data_dir=tmp_path / "n0",
        listen="mem:n0",
        peers=("mem:n1",),
        nodes=2,
        node_index=0,
        min_peers=1,
        rounds=4,
        round_timeout=5.0,
        heartbeat_interval=1.0,
        heartbeat_timeout=1000.0,
        compression=("delta", "quantize:8"),
    ).validated()
    ident = Identity.from_seed(bytes([1]) * 32)
    node = Node(
        cfg,
        identity=ident,
        transport=MemoryTransport(network, ident, "mem:n0"),
        train_in_thread=False,
        control_socket=False,
    )
    peer = Identity.from_seed(bytes([2]) * 32)
    got: list[int] = []  # rounds of the node's updates the peer received

    async def scripted(conn: Connection) -> None:
        me = peer.peer_id

        def update(round: int) -> bytes:
            return codec.encode(ModelUpdate(me, round, node.machine.params.copy(), 10))

        hello = Hello(me, 0, "default", ("mem:n1",), "", node.fingerprint.digest)
        await conn.send(codec.encode(hello))
        while True:
            try:
                msg = codec.decode(await conn.receive())
            except ConnectionClosed:
                return
            if isinstance(msg, Ping):
                await conn.send(codec.encode(Pong(me, msg.round, msg.nonce, msg.sent_at)))
            elif isinstance(msg, CompressedModelUpdate):
                got.append(msg.round)
                if msg.round == 1 and got.count(1) == 1:
                    # Far ahead, says the peer; it never answers the state request.
                    await conn.send(codec.encode(Ping(me, 3, 1, trio.current_time())))
                else:
                    await conn.send(update(msg.round))
            elif isinstance(msg, UpdateRequest):
                await conn.send(update(msg.round))

    transport = MemoryTransport(network, peer, "mem:n1")
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.listen, scripted)
        await nursery.start(node.run)
        with trio.fail_after(60):
            await node.done.wait()
        nursery.cancel_scope.cancel()

    assert node.counters["catch_ups"] == 0  # nobody answered: it stayed at round 1
    assert [row["round"] for row in node.history] == [0, 1, 2, 3]
    assert got == [0, 1, 2, 3]  # one compressed model per round, none sent twice
    assert not node.supervisor.contained
    assert not node.history[1]["timed_out"]


@pytest.mark.parametrize("per_peer", [False, True])
def test_a_model_the_encoder_refuses_is_not_sent_and_nothing_raises(
    per_peer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    box = UpdateOutbox("me", parse_pipeline(("delta", "quantize:8")), per_peer=per_peer)
    receiver = UpdateDecoder(D, max_frame_size=1 << 20)
    first = codec.decode(box.payloads(0, full(1.0), 3, ["r"])["r"])
    assert isinstance(first, CompressedModelUpdate)
    receiver.decode("me", 0, first.blob)
    bad = full(1.0)
    bad[2] = np.nan
    with caplog.at_level(logging.WARNING, logger="p2pfl.node"):
        assert box.payloads(1, bad, 3, ["r"]) == {}
    assert any("cannot encode" in r.getMessage() for r in caplog.records)
    # The stream goes on and stays decodable.
    nxt = codec.decode(box.payloads(2, full(2.0), 3, ["r"])["r"])
    assert isinstance(nxt, CompressedModelUpdate)
    np.testing.assert_allclose(receiver.decode("me", 2, nxt.blob), full(2.0), atol=0.05)
