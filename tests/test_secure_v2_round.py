"""Secure aggregation v2, one round end to end at the sans-IO level (issue 14).

A tiny router delivers `GroupSend`s between `MemberRound`s and `LeaderRound`s; tests drop
messages, silence members or play a malicious leader by hand. Each attack of issue 14
that the member side must stop is here, next to the honest runs it must not break.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from p2pfl.identity import Identity
from p2pfl.secure.admission import Admission
from p2pfl.secure.errors import Refused
from p2pfl.secure.group_driver import TO_LEADER
from p2pfl.secure.group_leader import LeaderRound, LeaderSettings
from p2pfl.secure.group_member import MemberPolicy, MemberRound
from p2pfl.secure.group_messages import (
    GroupJoin,
    GroupMessage,
    GroupOffer,
    GroupSend,
    MaskedVector,
    MaskList,
    SetupDone,
    Unmasking,
    UnmaskList,
)
from p2pfl.secure.masking import expand, fixed_point
from p2pfl.secure.round_keys import RoundKey

FED = "fed"
DIM = 257
ROUND = 7


def _identities(n: int) -> list[Identity]:
    return [Identity.from_seed(bytes([40 + i]) * 32) for i in range(n)]


@dataclass
class Net:
    """Full-mesh members plus a leader object on every node; synchronous delivery."""

    ids: list[Identity]
    graph: dict[int, set[int]] | None = None  # node index -> neighbour indices; None: mesh
    min_group: int = 3
    group_size: int = 8
    members: dict[str, MemberRound] = field(default_factory=dict)
    leaders: dict[str, LeaderRound] = field(default_factory=dict)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (at, from, reason)
    seen: list[tuple[str, str, GroupMessage]] = field(default_factory=list)  # (from, to, msg)
    deliver: Callable[[str, str, GroupMessage], bool] = lambda s, t, m: True
    now: float = 0.0
    relayed: bool = False  # members admit mates that are not neighbours (by proof)
    admission: Admission | None = None

    def __post_init__(self) -> None:
        keys = {i.peer_id: i.public_bytes for i in self.ids}
        settings = LeaderSettings(FED, group_size=self.group_size, min_group=self.min_group)
        index = {i.peer_id: n for n, i in enumerate(self.ids)}
        for ident in self.ids:
            me = ident.peer_id
            near = None if self.graph is None else self.graph[index[me]]
            neighbours = {
                p: k for p, k in keys.items() if p != me and (near is None or index[p] in near)
            }
            policy = MemberPolicy(
                FED,
                min_group=self.min_group,
                dim=DIM,
                relayed_mates=self.relayed,
                admission=self.admission,
            )
            self.members[me] = MemberRound(ident, policy, ROUND, neighbours)
            self.leaders[me] = LeaderRound(settings, me, ROUND, DIM, self.now, neighbours)

    def send(self, sender: str, sends: list[GroupSend]) -> None:
        queue = [(sender, s) for s in sends]
        while queue:
            frm, s = queue.pop(0)
            for to in s.to:
                if not self.deliver(frm, to, s.message):
                    continue
                self.seen.append((frm, to, s.message))
                try:
                    if isinstance(s.message, TO_LEADER):
                        out = self.leaders[to].on_message(frm, s.message, self.now)
                    else:
                        out = self.members[to].on_message(frm, s.message)
                except Refused as exc:
                    self.refused.append((to, frm, exc.reason))
                    continue
                queue += [(to, o) for o in out]

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for me, leader in self.leaders.items():
            self.send(me, leader.on_timeout(self.now))

    def run(self, updates: dict[str, np.ndarray], *, silent: frozenset[str] = frozenset()) -> None:
        for me, m in self.members.items():
            self.send(me, m.join())
        # Every neighbour declared: the offers went out without waiting for a timeout.
        assert all(leader.closed for leader in self.leaders.values())
        for me, m in self.members.items():
            if me not in silent:
                self.send(me, m.set_update(updates[me]))
        for _ in range(4):
            self.tick(30.0)


def _updates(ids: list[Identity], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.peer_id: rng.normal(0, 1, DIM).astype(np.float32) for i in ids}


def _tol(n: int) -> float:
    """Decoding error bound (docs/secure-aggregation.md): half a step plus float32 rounding."""
    return fixed_point(16.0, n).step + 16.0 * 2.0**-23


def _leader(net: Net) -> LeaderRound:
    (leader,) = {m.leader for m in net.members.values()}  # full mesh: one leader for all
    return net.leaders[leader]


def test_an_honest_group_gets_the_exact_mean_of_its_members() -> None:
    ids = _identities(5)
    net = Net(ids)
    updates = _updates(ids)
    net.run(updates)
    assert net.refused == []
    ((members, mean),) = _leader(net).results()
    assert set(members) == set(updates)
    expected = np.mean(list(updates.values()), axis=0)
    assert np.max(np.abs(mean - expected)) <= _tol(5)
    # Every member holds the same mean, to forward to its neighbours.
    assert all(
        m.mean is not None and np.array_equal(m.mean.mean, mean) for m in net.members.values()
    )


def test_a_member_that_drops_before_committing_costs_no_retry_round() -> None:
    ids = _identities(5)
    net = Net(ids)
    updates = _updates(ids, 1)
    gone = ids[2].peer_id
    net.run(updates, silent=frozenset({gone}))
    leader = _leader(net)
    ((members, mean),) = leader.results()
    assert gone not in members and len(members) == 4
    expected = np.mean([u for p, u in updates.items() if p != gone], axis=0)
    assert np.max(np.abs(mean - expected)) <= _tol(5)
    # Its round key was rebuilt from the survivors' shares; its self seed never was.
    key_shares = [p for _, _, m in net.seen if isinstance(m, Unmasking) for p, _ in m.key_shares]
    assert set(key_shares) == {gone}


def test_a_member_silent_at_the_reveal_step_is_rebuilt_from_seed_shares() -> None:
    ids = _identities(5)
    quiet = ids[3].peer_id
    net = Net(ids, deliver=lambda s, t, m: not (s == quiet and isinstance(m, Unmasking)))
    updates = _updates(ids, 2)
    net.run(updates)
    ((members, mean),) = _leader(net).results()
    assert len(members) == 5  # its vector counts; its self mask came from shares
    assert np.max(np.abs(mean - np.mean(list(updates.values()), axis=0))) <= _tol(5)


def test_a_leader_cannot_seat_a_victim_with_identities_it_minted() -> None:
    """Issue 14, reproduction 1: a group of the victim plus two self-made identities."""
    ids = _identities(4)
    net = Net(ids[:2])  # the victim and the leader know each other only
    victim = next(m for m in net.members.values() if m.leader != m.me)
    fakes = [i.peer_id for i in _identities(7)[5:]]  # never connected to the victim
    choosers = tuple(sorted([victim.me, *fakes]))
    offer = GroupOffer(victim.leader, ROUND, b"s" * 16, choosers, 3, 3, 16.0, DIM)
    with pytest.raises(Refused) as exc:
        victim.on_message(victim.leader, offer)
    assert exc.value.reason == "unauthenticated_mate"
    assert victim.phase == "out"  # and it will not join another group this round


@pytest.mark.parametrize("closed", ["secret", "allow_list"])
def test_relayed_mates_must_prove_membership_so_minted_identities_are_refused(
    closed: str,
) -> None:
    """With relayed mates allowed, a mate need not be a neighbour, but must show an
    identity key and the federation CA's proof (and pass the allow list). A leader in
    a federation with a secret, or facing an allow list, cannot mint them."""
    ids = _identities(2)
    fakes = _identities(7)[5:]
    secret = b"s3cret" if closed == "secret" else None
    allow = None if closed == "secret" else frozenset(i.peer_id for i in ids)
    admission = Admission(FED, secret, allow)
    net = Net(ids, relayed=True, admission=admission)
    victim = next(m for m in net.members.values() if m.leader != m.me)
    leader = victim.leader
    choosers = tuple(sorted([victim.me, *(f.peer_id for f in fakes)]))
    offer = GroupOffer(leader, ROUND, b"s" * 16, choosers, 3, 3, 16.0, DIM)
    [ready] = victim.on_message(leader, offer)  # non-neighbours are fine so far
    assert isinstance(ready.message, SetupDone)
    scope = victim.scope
    assert scope is not None
    # The leader signs round keys for its minted identities and proves them with the
    # CA it can make: the open federation's (it lacks the secret), or the real one.
    forger = Admission(FED, None) if closed == "secret" else admission
    setups = {victim.me: ready.message}
    for fake in fakes:
        key = RoundKey(fake, scope)
        setups[fake.peer_id] = SetupDone(
            fake.peer_id,
            ROUND,
            scope.session,
            scope.group,
            key.public,
            key.signature,
            fake.public_bytes,
            forger.prove(fake),
        )
    masklist = MaskList(
        leader,
        ROUND,
        scope.session,
        scope.group,
        choosers,
        tuple((m.public, m.signature, m.identity, m.proof) for m in (setups[p] for p in choosers)),
    )
    with pytest.raises(Refused) as exc:
        victim.on_message(leader, masklist)
    assert exc.value.reason == "mate_not_admitted"
    assert ("not_a_member" if closed == "secret" else "not_allowed") in str(exc.value)
    assert victim.phase == "out" and not victim._held  # it dealt no share to anyone


def test_a_group_below_the_members_own_minimum_is_refused() -> None:
    ids = _identities(6)
    net = Net(ids)
    victim = next(iter(net.members.values()))
    strict = MemberRound(ids[0], MemberPolicy(FED, min_group=4, dim=DIM), ROUND, victim.neighbours)
    mates = [i.peer_id for i in ids[1:3]]  # the leader asks for groups of 3
    offer = GroupOffer(
        strict.leader, ROUND, b"s" * 16, tuple(sorted([strict.me, *mates])), 3, 3, 16.0, DIM
    )
    with pytest.raises(Refused) as exc:
        strict.on_message(strict.leader, offer)
    assert exc.value.reason == "group_too_small"


def test_one_group_per_round_and_only_from_the_members_own_leader() -> None:
    ids = _identities(5)
    net = Net(ids)
    m = next(x for x in net.members.values() if x.leader != x.me)
    other = next(p for p in m.neighbours if p != m.leader)
    choosers = tuple(sorted(m.neighbours | {m.me: b""}))
    with pytest.raises(Refused) as exc:
        m.on_message(other, GroupOffer(other, ROUND, b"s" * 16, choosers, 8, 3, 16.0, DIM))
    assert exc.value.reason == "not_my_leader"
    offer = GroupOffer(m.leader, ROUND, b"s" * 16, choosers, 8, 3, 16.0, DIM)
    m.on_message(m.leader, offer)
    with pytest.raises(Refused) as exc:
        m.on_message(m.leader, GroupOffer(m.leader, ROUND, b"t" * 16, choosers, 8, 3, 16.0, DIM))
    assert exc.value.reason == "second_offer"


def test_declaring_a_member_dropped_after_its_vector_arrived_yields_no_key_share() -> None:
    """A malicious leader holds every vector, then tells the others the victim dropped:
    they acked its commit, so none reveals its round-key share."""
    ids = _identities(5)
    net = Net(ids)
    leader = _leader(net)
    victim = next(p for p in net.members if p != leader.me)

    def lie(sender: str, to: str, msg: GroupMessage) -> bool:
        if isinstance(msg, UnmaskList) and victim in msg.members:
            forged = tuple(p for p in msg.members if p != victim)
            for peer in forged:
                net.send(
                    sender,
                    [
                        GroupSend(
                            (peer,), UnmaskList(sender, msg.round, msg.session, msg.group, forged)
                        )
                    ],
                )
            return False
        return True

    net.deliver = lie
    net.run(_updates(ids, 3))
    # The leader did get the victim's vector ...
    assert any(isinstance(m, MaskedVector) and s == victim for s, _, m in net.seen)
    # ... but every honest mate refused the forged list, so no share of its key left.
    reasons = [r for at, _, r in net.refused if at != victim]
    assert reasons and set(reasons) == {"dropped_member_committed"}
    assert not any(isinstance(m, Unmasking) and m.key_shares for _, _, m in net.seen)
    assert leader.results() == []


def test_a_colluding_member_and_the_leader_see_only_noise_of_an_honest_update() -> None:
    """Leader + min_group - 2 = 1 colluding member (group of 4) pool all they saw: the
    victim's vector minus its revealed self mask and the colluder's pair mask is still
    uniform on the ring, because the pair mask with the other honest member remains."""
    ids = _identities(4)
    net = Net(ids)
    updates = _updates(ids, 4)
    net.run(updates)
    leader = _leader(net)
    honest = [p for p in net.members if p != leader.me]
    victim, colluder = honest[0], honest[1]
    vec = next(m.masked for s, _, m in net.seen if isinstance(m, MaskedVector) and s == victim)
    seed = next(m.seed for s, _, m in net.seen if isinstance(m, Unmasking) and s == victim)
    c = net.members[colluder]
    assert c._key is not None
    residual = vec - expand(seed, DIM)
    pair = expand(c._key.pair_seed(victim, c._mate_keys[victim]), DIM)
    residual = residual - pair if victim < colluder else residual + pair
    encoded = fixed_point(16.0, 4).encode(updates[victim])
    assert not np.array_equal(residual, encoded)
    # Uniform on Z_2^32: almost no word lands in the encoding's range |q| <= 2^30 / 4.
    in_range = np.abs(residual.view(np.int32).astype(np.int64)) <= (1 << 30) // 4
    assert in_range.mean() < 0.5


@pytest.mark.parametrize("shape", ["mesh", "sparse"])
def test_colluding_aggregators_pooling_every_group_mean_solve_for_no_update(shape: str) -> None:
    """Issue 14, reproduction 3: under v1, 4 colluders on a 20-node mesh solved ~15 of
    the 16 other updates by pooling overlapping group sums. Now each update is in one
    group per round, so even all leaders together hold disjoint sums of >= 3 updates:
    no single update is in the span of what they saw."""
    rng = np.random.default_rng(5)
    n = 16
    graph: dict[int, set[int]] = {i: set(range(n)) - {i} for i in range(n)}
    if shape == "sparse":  # a ring plus random chords; mates meet through their leader
        graph = {i: set() for i in range(n)}
        for i in range(n):
            for j in ((i + 1) % n, int(rng.integers(n))):
                if j != i:
                    graph[i].add(j)
                    graph[j].add(i)
    ids = _identities(n)
    net = Net(ids, graph=graph, group_size=4, relayed=True)
    net.run(_updates(ids, 6))
    groups = [members for leader in net.leaders.values() for members, _ in leader.results()]
    assert groups, "some groups must complete"
    if shape == "mesh":
        assert sorted(len(g) for g in groups) == [4, 4, 4, 4]  # every update, once
    summed = [p for g in groups for p in g]
    assert len(summed) == len(set(summed)), "an update entered two sums"
    assert all(len(g) >= 3 for g in groups)
    peers = [i.peer_id for i in ids]
    rows = np.array([[p in g for p in peers] for g in groups], dtype=float)
    solvable = 0
    for k in range(n):
        unit = np.eye(n)[k]
        coef, *_ = np.linalg.lstsq(rows.T, unit, rcond=None)
        solvable += bool(np.allclose(rows.T @ coef, unit))
    assert solvable == 0


def test_a_leader_offers_once_every_neighbour_declared_or_at_the_join_timeout() -> None:
    ids = [i.peer_id for i in _identities(4)]
    me, others = ids[0], ids[1:]
    settings = LeaderSettings(FED, join_timeout=5.0)
    leader = LeaderRound(settings, me, ROUND, DIM, 0.0, others)
    assert leader.on_message(me, GroupJoin(me, ROUND, me), 0.1) == []
    assert leader.on_message(others[0], GroupJoin(others[0], ROUND, me), 0.2) == []
    # A declaration for another leader counts as declared, not as a join.
    assert leader.on_message(others[1], GroupJoin(others[1], ROUND, others[0]), 0.3) == []
    assert not leader.closed and leader.next_deadline() == 5.0
    assert leader.on_timeout(4.9) == []
    (offer,) = leader.on_timeout(5.0)  # the third neighbour never declared
    assert isinstance(offer.message, GroupOffer) and offer.message.choosers == tuple(
        sorted([me, others[0]])
    )
    # A late chooser gets the final offer at once: it is not in it, so it knows it has
    # no group now rather than at its own timeout.
    (late,) = leader.on_message(others[2], GroupJoin(others[2], ROUND, me), 5.1)
    assert late.to == (others[2],) and late.message is offer.message
    with pytest.raises(Refused) as exc:  # a chooser joining twice
        leader.on_message(others[0], GroupJoin(others[0], ROUND, me), 5.2)
    assert exc.value.reason == "late_join"
    # When all declare, no timeout is needed.
    fast = LeaderRound(settings, me, ROUND, DIM, 0.0, others)
    for peer in ids[:3]:
        assert fast.on_message(peer, GroupJoin(peer, ROUND, me), 0.1) == []
    (offer,) = fast.on_message(others[2], GroupJoin(others[2], ROUND, others[1]), 0.2)
    assert isinstance(offer.message, GroupOffer)
    assert offer.message.choosers == tuple(sorted(ids[:3]))


def test_a_member_lost_after_committing_fails_its_group_rather_than_leak() -> None:
    """Its mates acked its commit, so they keep its key share sealed: the leader cannot
    strip its pair masks, and the group fails for the round (availability, not privacy)."""
    ids = _identities(5)
    lost = ids[1].peer_id
    net = Net(ids, deliver=lambda s, t, m: not (s == lost and isinstance(m, MaskedVector)))
    net.run(_updates(ids, 8))
    leader = _leader(net)
    assert leader.results() == []
    assert leader.groups and all(g.phase == "failed" for g in leader.groups)
    assert all(g.reason.startswith("unmask_failed") for g in leader.groups)
    refusals = {r for at, _, r in net.refused if at != lost}
    assert refusals == {"dropped_member_committed"}
    assert not any(isinstance(m, Unmasking) and m.key_shares for _, _, m in net.seen)


def test_a_leader_equivocating_on_the_mask_list_cannot_rebuild_a_members_key() -> None:
    """Found while writing the threat-model table. The leader (also a member, so it
    holds shares itself) holds back the victim's mask list, lets honest m submit, tells
    m alone that the victim dropped (true at that moment), then gives the victim a list
    without m. If m held a share of the victim's round key, m's reveal plus the
    leader's own share (t = 2) would rebuild it, and the victim's later self-seed
    reveal would open its update. Shares are therefore dealt only after the mask list,
    and only to its members: m, left out of the victim's list, holds none."""
    ids = _identities(4)
    stash: list[MaskList] = []
    net = Net(ids, group_size=8)
    leader = _leader(net)
    L = leader.me
    victim, m, h = sorted(p for p in net.members if p != L)

    def hold_victims_list(sender: str, to: str, msg: GroupMessage) -> bool:
        if isinstance(msg, MaskList) and to == victim:
            stash.append(msg)
            return False
        return not isinstance(msg, UnmaskList)  # the leader scripts these by hand

    net.deliver = hold_victims_list
    updates = _updates(ids, 9)
    for me, member in net.members.items():
        net.send(me, member.join())
    for me in (L, m, h):
        net.send(me, net.members[me].set_update(updates[me]))
    # Without its mask list the victim acks no commit, so nobody can submit yet.
    assert all(net.members[p].phase == "committing" for p in (L, m, h))
    (real,) = stash
    # m alone hears that the victim dropped: it has not submitted, so it reveals nothing.
    u2 = tuple(sorted((L, m, h)))
    with pytest.raises(Refused) as exc:
        net.members[m].on_message(L, UnmaskList(L, ROUND, real.session, real.group, u2))
    assert exc.value.reason == "unmask_out_of_turn"
    # Now the victim gets a list without m (the real setups of L and h), commits to L
    # and h, and submits.
    keep = [i for i, p in enumerate(real.members) if p != m]
    fake = MaskList(
        L,
        ROUND,
        real.session,
        real.group,
        tuple(real.members[i] for i in keep),
        tuple(real.setups[i] for i in keep),
    )
    net.send(victim, net.members[victim].on_message(L, fake))
    net.send(victim, net.members[victim].set_update(updates[victim]))
    assert net.members[victim].phase == "submitted"
    # What the coalition holds of the victim's round key: m's share (none: it was left
    # out of the victim's list) and the leader's own share as a member.
    assert victim not in net.members[m]._held
    held = (victim in net.members[m]._held) + (victim in net.members[L]._held)
    assert held < 2  # below the threshold t = 2


def test_a_member_that_leaves_is_not_waited_for_at_any_step() -> None:
    """A member that says it abstains (or whose link closes) is dropped at once: before
    setup, before its vector (its masks are rebuilt from shares) and at the reveal step
    (its self seed is rebuilt); no step waits for its deadline."""
    for step in ("setup", "collect", "reveal"):
        ids = _identities(5)
        net = Net(ids)
        leader = _leader(net)
        gone = next(p for p in net.members if p != leader.me)
        updates = _updates(ids, 11)

        def hold(
            sender: str, to: str, msg: GroupMessage, step: str = step, gone: str = gone
        ) -> bool:
            if sender != gone:
                return True
            if step == "setup":
                return False  # never even set up
            return not isinstance(msg, Unmasking)  # "collect": it never trains

        net.deliver = hold
        for me, m in net.members.items():
            net.send(me, m.join())
        for me, m in net.members.items():
            if step != "collect" or me != gone:
                net.send(me, m.set_update(updates[me]))
        assert leader.results() == []  # waiting for it
        net.send(leader.me, leader.member_gone(gone, net.now))
        (members, mean) = leader.results()[0]
        expected_in = [p for p in updates if p != gone] if step != "reveal" else list(updates)
        assert sorted(members) == sorted(expected_in), step
        want = np.mean([updates[p] for p in expected_in], axis=0)
        assert np.max(np.abs(mean - want)) <= _tol(5), step
        assert net.now == 0.0  # no deadline passed


def test_a_member_with_a_non_finite_update_leaves_before_committing() -> None:
    """Checked before the commit: once mates ack, a vector that never comes would fail
    the group; before it, the member simply drops out and the group completes."""
    ids = _identities(4)
    net = Net(ids)
    leader = _leader(net)
    bad = next(p for p in net.members if p != leader.me)
    updates = _updates(ids, 12)
    updates[bad] = np.full(DIM, np.nan, dtype=np.float32)
    for me, m in net.members.items():
        net.send(me, m.join())
    for me, m in net.members.items():
        if me == bad:
            with pytest.raises(Refused) as exc:
                m.set_update(updates[me])
            assert exc.value.reason == "bad_update" and m.phase == "out"
        else:
            net.send(me, m.set_update(updates[me]))
    net.send(leader.me, leader.member_gone(bad, net.now))  # it abstains to its neighbours
    ((members, mean),) = leader.results()
    assert bad not in members and len(members) == 3
    want = np.mean([u for p, u in updates.items() if p != bad], axis=0)
    assert np.max(np.abs(mean - want)) <= _tol(4)


# Ported from v1's tests (tests/test_secure_protocol.py, removed with v1): what a leader does
# with messages it must not sum, and how far one member can move the group means.


def test_a_leader_refuses_what_it_must_not_sum_and_the_round_still_completes() -> None:
    ids = _identities(5)
    net = Net(ids[:4])
    updates = _updates(ids[:4], 13)
    for me, m in net.members.items():
        net.send(me, m.join())
    leader = _leader(net)
    (g,) = leader.groups
    assert g.phase == "collect"
    member = next(p for p in g.u1 if p != leader.me)
    outsider = ids[4].peer_id
    now, s = net.now, leader.session
    zeros = np.zeros(DIM, np.uint32)
    cases: list[tuple[str, str, GroupMessage]] = [
        ("wrong_round", member, MaskedVector(member, ROUND + 1, s, 0, zeros)),
        ("wrong_session", member, MaskedVector(member, ROUND, b"x" * 16, 0, zeros)),
        ("not_in_group", outsider, MaskedVector(outsider, ROUND, s, 0, zeros)),
        ("not_in_group", member, MaskedVector(member, ROUND, s, 1, zeros)),
        ("wrong_dim", member, MaskedVector(member, ROUND, s, 0, np.zeros(DIM + 1, np.uint32))),
        ("unexpected_reveal", member, Unmasking(member, ROUND, s, 0, b"z" * 32, (), ())),
        ("unexpected_setup_done", member, SetupDone(member, ROUND, s, 0, *g.setups[member])),
        ("not_for_leaders", member, UnmaskList(member, ROUND, s, 0, g.u1)),
    ]
    for reason, sender, msg in cases:
        with pytest.raises(Refused) as exc:
            leader.on_message(sender, msg, now)
        assert exc.value.reason == reason, (reason, msg)
    assert g.vectors == {}
    for me, m in net.members.items():
        net.send(me, m.set_update(updates[me]))
    real = next(m for s_, _, m in net.seen if isinstance(m, MaskedVector) and s_ == member)
    with pytest.raises(Refused) as exc:  # a second vector, once its first is in
        leader.on_message(member, real, net.now)
    assert exc.value.reason == "unexpected_vector"
    for _ in range(3):
        net.tick(30.0)
    ((members, mean),) = leader.results()
    assert len(members) == 4
    assert np.max(np.abs(mean - np.mean(list(updates.values()), axis=0))) <= _tol(4)


def test_a_garbage_masked_vector_fails_its_group_instead_of_skewing_the_mean() -> None:
    """A member's vector is uniform on the ring to the leader, so it cannot be checked
    on arrival; a random one makes the unmasked sum out of the range honest encodings
    can reach, and the group fails (probability 1 - 2^-DIM) rather than decode noise."""
    ids = _identities(4)
    rng = np.random.default_rng(14)
    forged: list[MaskedVector] = []

    def corrupt(sender: str, to: str, msg: GroupMessage) -> bool:
        if (
            isinstance(msg, MaskedVector)
            and sender == ids[1].peer_id
            and all(msg is not f for f in forged)
        ):
            garbage = rng.integers(0, 2**32, DIM, dtype=np.uint32)
            forged.append(dataclasses.replace(msg, masked=garbage))
            net.send(sender, [GroupSend((to,), forged[-1])])
            return False
        return True

    net = Net(ids, deliver=corrupt)
    net.run(_updates(ids, 15))
    leader = _leader(net)
    assert leader.results() == []
    (g,) = leader.groups
    assert g.phase == "failed" and g.reason.startswith("unmask_failed")
    assert "out of range" in g.reason


def test_a_byzantine_member_moves_only_its_own_groups_mean_and_a_median_discards_it() -> None:
    """Its update is clipped to [-R, R] before masking, so its group's mean moves by at
    most about R / n; the other groups' means are exact, and a robust rule over group
    means (here the coordinate-wise median) ignores the one it wrecked."""
    ids = _identities(12)
    net = Net(ids, group_size=4)
    rng = np.random.default_rng(16)
    honest = rng.normal(0.3, 0.05, DIM).astype(np.float32)
    updates = {i.peer_id: honest + rng.normal(0, 0.01, DIM).astype(np.float32) for i in ids}
    attacker = ids[5].peer_id
    updates[attacker] = -100.0 * honest  # sign flip, scaled: clipped to -16 on the way in
    net.run(updates)
    results = _leader(net).results()
    assert sorted(len(m) for m, _ in results) == [4, 4, 4]
    means = np.stack([mean for _, mean in results])
    deviation = np.abs(means - honest).max(axis=1)
    bad = [k for k, (members, _) in enumerate(results) if attacker in members]
    assert len(bad) == 1
    assert deviation[bad[0]] > 0.5  # the attacker's group mean is wrecked ...
    assert np.delete(deviation, bad[0]).max() < 0.05  # ... and only that one
    clipped = np.clip(updates[attacker], -16.0, 16.0)
    members, mean = results[bad[0]]
    want = np.mean([clipped if p == attacker else updates[p] for p in members], axis=0)
    assert np.max(np.abs(mean - want)) <= _tol(4)
    assert np.abs(np.median(means, axis=0) - honest).max() < 0.05
    assert np.abs(means.mean(axis=0) - honest).max() > 0.1  # a plain mean would not
