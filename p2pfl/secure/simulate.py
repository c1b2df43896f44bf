"""In-process driver of one secure round (aggregator + members), for tests and benchmarks.

It delivers the state machines' messages directly, with a virtual clock that jumps to
the next deadline when nothing is in flight. Faults are declared up front: members
that never send their vector (`silent`), that go quiet after sending it
(`silent_in_reveal`), or that send a vector replaced by `corrupt_masked`. It is the
reference for what the node must do; it is not used by the node itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from p2pfl.identity import Identity
from p2pfl.secure.keys import KeyStore, SessionKey
from p2pfl.secure.messages import (
    GroupAnnounce,
    GroupRetry,
    MaskedUpdate,
    MaskReveal,
    UnmaskRequest,
)
from p2pfl.secure.protocol import AggregatorRound, SecureMember, SecureResult, SecureSettings, Send


@dataclass(slots=True)
class SimNode:
    identity: Identity
    key: SessionKey
    member: SecureMember

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def make_nodes(n: int, federation: str, *, epoch: int = 1) -> list[SimNode]:
    nodes = []
    for _ in range(n):
        identity = Identity.generate()
        key = SessionKey(identity, federation, epoch)
        nodes.append(SimNode(identity, key, SecureMember(federation, key)))
    return nodes


def run_round(
    settings: SecureSettings,
    aggregator: SimNode,
    members: Collection[SimNode],
    updates: Mapping[str, np.ndarray],
    round: int = 1,
    *,
    silent: Collection[str] = (),
    silent_in_reveal: Collection[str] = (),
    corrupt_masked: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    transcript: list[tuple[str, object]] | None = None,
) -> tuple[SecureResult, AggregatorRound]:
    """Run one aggregator's round to completion; returns (result, aggregator machine).

    `transcript`, if given, receives every (sender, message) the aggregator received,
    including late ones: what a curious aggregator could keep.
    """
    store = KeyStore(settings.federation)
    for node in members:
        store.add(node.peer_id, node.key.announcement.to_bytes())
    dim = len(next(iter(updates.values())))
    agg = AggregatorRound(
        settings,
        aggregator=aggregator.peer_id,
        round=round,
        dim=dim,
        keys={p: a for p in (n.peer_id for n in members) if (a := store.get(p)) is not None},
    )
    by_id = {n.peer_id: n for n in members}
    corrupt = dict(corrupt_masked or {})
    now = 0.0
    inbox: deque[tuple[str, Send]] = deque(("A", s) for s in agg.start(now))
    for node in members:
        if node.peer_id not in silent:
            node.member.set_update(round, updates[node.peer_id])
    while True:
        while inbox:
            origin, send = inbox.popleft()
            for dest in send.to:
                if dest == aggregator.peer_id:
                    msg = send.message
                    assert isinstance(msg, MaskedUpdate | MaskReveal)
                    if transcript is not None:
                        transcript.append((origin, msg))
                    inbox.extend(("A", s) for s in agg.on_message(origin, msg, now))
                    continue
                if dest in silent or (
                    dest in silent_in_reveal and isinstance(send.message, UnmaskRequest)
                ):
                    continue
                m = send.message
                assert isinstance(m, GroupAnnounce | GroupRetry | UnmaskRequest)
                for out in by_id[dest].member.on_message(aggregator.peer_id, m):
                    out = _maybe_corrupt(out, corrupt.get(dest))
                    inbox.append((dest, out))
        if agg.done:
            return agg.result(), agg
        deadline = agg.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        inbox.extend(("A", s) for s in agg.on_timeout(now))


def _maybe_corrupt(send: Send, fn: Callable[[np.ndarray], np.ndarray] | None) -> Send:
    if fn is None or not isinstance(send.message, MaskedUpdate):
        return send
    m = send.message
    bad = MaskedUpdate(
        sender=m.sender,
        round=m.round,
        session=m.session,
        group=m.group,
        attempt=m.attempt,
        masked=np.asarray(fn(m.masked), dtype=np.uint32),
    )
    return Send(send.to, bad)
