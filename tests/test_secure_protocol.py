"""Secure round state machines: grouping, dropouts, refusals, Byzantine members."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.identity import Identity
from p2pfl.secure.grouping import group_sizes, make_groups, max_group_size
from p2pfl.secure.keys import SessionKey
from p2pfl.secure.masking import fixed_point
from p2pfl.secure.messages import (
    GroupAnnounce,
    GroupRetry,
    MaskedUpdate,
    MaskReveal,
    UnmaskRequest,
    wire_size,
)
from p2pfl.secure.protocol import (
    AggregatorRound,
    Refused,
    SecureMember,
    SecureSettings,
    SecureStats,
)
from p2pfl.secure.simulate import SimNode, make_nodes, run_round

FED = "fed"
CLIP = 4.0


@pytest.fixture(scope="module")
def nodes() -> list[SimNode]:
    return make_nodes(21, FED)


def _fresh(nodes: list[SimNode]) -> list[SimNode]:
    """Same identities and keys, new member state (one announcement per round each)."""
    return [SimNode(n.identity, n.key, SecureMember(FED, n.key)) for n in nodes]


def _updates(members: list[SimNode], d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n.peer_id: rng.uniform(-1, 1, d).astype(np.float32) for n in members}


def _tol(n: int) -> float:
    return 0.5 * fixed_point(CLIP, n).step + 2.0**-23 * CLIP


def _check_means(result: object, updates: dict[str, np.ndarray]) -> None:
    for members, mean in zip(result.groups, result.means, strict=True):  # type: ignore[attr-defined]
        expected = np.mean([updates[p] for p in members], axis=0)
        assert np.max(np.abs(mean - expected)) <= _tol(len(members))


# ------------------------------------------------------------------------ grouping


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), g=st.integers(3, 9), r=st.integers(0, 2**20))
def test_grouping_partitions_neighbours_into_groups_of_3_to_max_g_5(n: int, g: int, r: int) -> None:
    peers = [f"peer{i:03d}" for i in range(n)]
    groups = make_groups(FED, r, "agg", peers[::-1], g)
    assert groups == make_groups(FED, r, "agg", peers, g)  # input order is irrelevant
    flat = [p for grp in groups for p in grp]
    if n < 3:
        assert groups == ()
        return
    assert sorted(flat) == peers
    assert all(3 <= len(grp) <= max_group_size(g) for grp in groups)
    assert all(list(grp) == sorted(grp) for grp in groups)
    assert sorted(len(grp) for grp in groups) == sorted(group_sizes(n, g))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_grouping_depends_on_round_and_aggregator() -> None:
    peers = [f"p{i:02d}" for i in range(24)]
    base = make_groups(FED, 1, "agg", peers, 4)
    assert base != make_groups(FED, 2, "agg", peers, 4)
    assert base != make_groups(FED, 1, "other", peers, 4)
    with pytest.raises(ValueError):
        make_groups(FED, 1, "p00", peers, 4)
    with pytest.raises(ValueError):
        group_sizes(10, 2)


# ------------------------------------------------------------------- full rounds


def test_complete_round_yields_exact_group_means(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:13])
    updates = _updates(members, 777)
    s = SecureSettings(FED, group_size=4, clip=CLIP)
    result, agg = run_round(s, a, members, updates)
    assert result.means.shape == (3, 777) and result.means.dtype == np.float32
    assert result.counts == (4, 4, 4) and result.dropped == ()
    _check_means(result, updates)
    st_ = result.stats
    assert (st_.groups_formed, st_.groups_completed, st_.retries, st_.rejected) == (3, 3, 0, 0)
    assert st_.bytes_in >= 12 * 4 * 777 and st_.plain_bytes >= 12 * 4 * 777
    assert agg.next_deadline() is None and agg.done


def test_member_dropping_mid_round_is_retried_and_the_round_completes(
    nodes: list[SimNode],
) -> None:
    a, members = nodes[0], _fresh(nodes[1:9])
    updates = _updates(members, 300, seed=1)
    s = SecureSettings(FED, group_size=4, clip=CLIP)
    quitter = make_groups(FED, 1, a.peer_id, [m.peer_id for m in members], 4)[0][1]
    result, _ = run_round(s, a, members, updates, silent={quitter})
    assert result.dropped == () and sorted(result.counts) == [3, 4]
    assert all(quitter not in g for g in result.groups)
    _check_means(result, updates)
    assert (result.stats.retries, result.stats.members_dropped) == (1, 1)


def test_group_below_three_is_left_out_and_counted(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:7])  # two groups of 3
    updates = _updates(members, 64, seed=2)
    groups = make_groups(FED, 1, a.peer_id, [m.peer_id for m in members], 3)
    result, _ = run_round(
        SecureSettings(FED, group_size=3, clip=CLIP), a, members, updates, silent={groups[0][0]}
    )
    assert result.dropped == ((0, "too_few_members"),)
    assert result.groups == (groups[1],)
    _check_means(result, updates)
    assert (result.stats.groups_dropped, result.stats.members_dropped) == (1, 1)


def test_silence_during_reveal_fails_only_that_group(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:9])
    updates = _updates(members, 64, seed=3)
    groups = make_groups(FED, 1, a.peer_id, [m.peer_id for m in members], 4)
    result, _ = run_round(
        SecureSettings(FED, group_size=4, clip=CLIP),
        a,
        members,
        updates,
        silent_in_reveal={groups[1][2]},
    )
    assert result.dropped == ((1, "reveal_timeout"),) and result.groups == (groups[0],)


def test_retries_are_bounded_by_max_attempts(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:6])  # one group of 5
    updates = _updates(members, 32, seed=4)
    result, _ = run_round(
        SecureSettings(FED, group_size=5, clip=CLIP, max_attempts=1),
        a,
        members,
        updates,
        silent={members[0].peer_id},
    )
    assert result.dropped == ((0, "max_attempts"),)


def test_fewer_than_three_neighbours_form_no_group(nodes: list[SimNode]) -> None:
    agg = AggregatorRound(
        SecureSettings(FED),
        aggregator=nodes[0].peer_id,
        round=1,
        dim=8,
        keys={n.peer_id: n.key.announcement for n in nodes[1:3]},
    )
    assert agg.start(0.0) == [] and agg.done
    result = agg.result()
    assert result.means.shape == (0, 8) and result.stats.groups_formed == 0


def test_peer_gone_retries_without_waiting_for_the_deadline(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:5])  # one group of 4
    s = SecureSettings(FED, group_size=4, clip=CLIP)
    agg = AggregatorRound(
        s,
        aggregator=a.peer_id,
        round=1,
        dim=16,
        keys={m.peer_id: m.key.announcement for m in members},
    )
    (announce,) = agg.start(0.0)
    for m in members[1:]:
        m.member.on_message(a.peer_id, announce.message)  # type: ignore[arg-type]
        (out,) = m.member.set_update(1, np.ones(16, np.float32))
        assert agg.on_message(m.peer_id, out.message, 1.0) == []  # type: ignore[arg-type]
    (retry,) = agg.peer_gone(members[0].peer_id, 2.0)
    assert isinstance(retry.message, GroupRetry) and retry.message.attempt == 1
    assert agg.next_deadline() == 2.0 + s.retry_timeout
    assert agg.peer_gone(members[0].peer_id, 2.5) == []  # no longer a member


def test_peer_gone_after_sending_or_before_revealing(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:6])  # one group of 5
    s = SecureSettings(FED, group_size=5, clip=CLIP)
    agg = AggregatorRound(
        s,
        aggregator=a.peer_id,
        round=1,
        dim=16,
        keys={m.peer_id: m.key.announcement for m in members},
    )
    (announce,) = agg.start(0.0)
    outs = []
    for m in members:
        m.member.on_message(a.peer_id, announce.message)  # type: ignore[arg-type]
        (out,) = m.member.set_update(1, np.ones(16, np.float32))
        outs.append(out)
    assert agg.on_message(members[0].peer_id, outs[0].message, 1.0) == []  # type: ignore[arg-type]
    assert agg.peer_gone(members[0].peer_id, 1.5) == []  # sent, then lost: keep waiting
    for m, out in zip(members[1:-1], outs[1:-1], strict=True):
        assert agg.on_message(m.peer_id, out.message, 2.0) == []  # type: ignore[arg-type]
    # The last vector completes the attempt, but the lost member could never reveal:
    # retry right away without it instead of unmasking.
    (retry,) = agg.on_message(members[-1].peer_id, outs[-1].message, 3.0)  # type: ignore[arg-type]
    assert isinstance(retry.message, GroupRetry)
    assert retry.to == tuple(sorted(m.peer_id for m in members[1:]))
    survivors = members[1:]
    unmask = None
    for m in survivors:
        (out,) = m.member.on_message(a.peer_id, retry.message)  # type: ignore[arg-type]
        sends = agg.on_message(m.peer_id, out.message, 4.0)  # type: ignore[arg-type]
        unmask = sends[0] if sends else unmask
    assert unmask is not None and isinstance(unmask.message, UnmaskRequest)
    (rev,) = survivors[0].member.on_message(a.peer_id, unmask.message)  # type: ignore[arg-type]
    agg.on_message(survivors[0].peer_id, rev.message, 5.0)  # type: ignore[arg-type]
    assert agg.peer_gone(survivors[0].peer_id, 5.5) == []  # already revealed: harmless
    assert agg.peer_gone(survivors[1].peer_id, 6.0) == []  # cannot reveal any more
    assert agg.done and agg.result().dropped == ((0, "reveal_timeout"),)


# ---------------------------------------------------------------- Byzantine members


def test_byzantine_member_corrupts_only_its_group_and_the_median_discards_it(
    nodes: list[SimNode],
) -> None:
    a, members = nodes[0], _fresh(nodes[1:21])  # 20 neighbours, 5 groups of 4
    d = 200
    rng = np.random.default_rng(5)
    honest = rng.normal(0.3, 0.05, d).astype(np.float32)
    updates = {m.peer_id: honest + rng.normal(0, 0.01, d).astype(np.float32) for m in members}
    groups = make_groups(FED, 1, a.peer_id, list(updates), 4)
    attacker = groups[2][0]
    updates[attacker] = -100.0 * honest  # sign flip, scaled: clipped to -R on the way in
    result, _ = run_round(SecureSettings(FED, group_size=4, clip=CLIP), a, members, updates)
    assert result.counts == (4,) * 5
    _check_means(result, {p: np.clip(u, -CLIP, CLIP) for p, u in updates.items()})
    deviation = np.abs(result.means - honest).max(axis=1)
    bad = [i for i, g in enumerate(result.groups) if attacker in g]
    assert bad == [2]
    assert deviation[2] > 0.5  # the attacker's group mean is wrecked...
    assert np.delete(deviation, 2).max() < 0.05  # ...and only that one
    median = np.median(result.means, axis=0)
    assert np.abs(median - honest).max() < 0.05  # the robust rule discards it
    assert np.abs(result.means.mean(axis=0) - honest).max() > 0.1  # a plain mean would not


def test_garbage_masked_vector_fails_only_its_group(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:9])
    updates = _updates(members, 512, seed=6)
    groups = make_groups(FED, 1, a.peer_id, list(updates), 4)
    rng = np.random.default_rng(7)
    result, _ = run_round(
        SecureSettings(FED, group_size=4, clip=CLIP),
        a,
        members,
        updates,
        corrupt_masked={groups[0][1]: lambda v: rng.integers(0, 2**32, v.size, dtype=np.uint32)},
    )
    assert result.dropped == ((0, "bad_sum"),) and result.groups == (groups[1],)
    _check_means(result, updates)


# ------------------------------------------------------------- member refusals


def _announce(
    nodes: list[SimNode], n: int = 4, **changes: object
) -> tuple[GroupAnnounce, list[SimNode]]:
    a, members = nodes[0], _fresh(nodes[1 : n + 1])
    agg = AggregatorRound(
        SecureSettings(FED, group_size=4, clip=CLIP),
        aggregator=a.peer_id,
        round=1,
        dim=8,
        keys={m.peer_id: m.key.announcement for m in members},
    )
    (send,) = agg.start(0.0)
    assert isinstance(send.message, GroupAnnounce)
    return dataclasses.replace(send.message, **changes), members  # type: ignore[arg-type]


def _refusal(member: SecureMember, sender: str, msg: object) -> str:
    with pytest.raises(Refused) as err:
        member.on_message(sender, msg)  # type: ignore[arg-type]
    return err.value.reason


def test_member_rejects_a_substituted_or_unsigned_relayed_key(nodes: list[SimNode]) -> None:
    msg, members = _announce(nodes)
    victim_index = 1
    me = next(m for m in members if m.peer_id != msg.participants[victim_index])
    mallory = SessionKey(Identity.generate(), FED, 1)
    forged = dataclasses.replace(
        SessionKey(Identity.generate(), FED, 1).announcement,
        identity_key=msg.keys[victim_index][1:33],
    )
    unsigned = msg.keys[victim_index][:73] + bytes(64)
    for bad in (mallory.announcement.to_bytes(), forged.to_bytes(), unsigned):
        keys = list(msg.keys)
        keys[victim_index] = bad
        tampered = dataclasses.replace(msg, keys=tuple(keys))
        assert _refusal(me.member, msg.sender, tampered) == "bad_key"
    # Our own key must come back exactly as we announced it.
    mine = msg.participants.index(me.peer_id)
    keys = list(msg.keys)
    keys[mine] = mallory.announcement.to_bytes()
    assert _refusal(me.member, msg.sender, dataclasses.replace(msg, keys=tuple(keys))) == "bad_key"
    assert me.member.on_message(msg.sender, msg) == []  # the genuine one is accepted


def test_member_refuses_regrouping_and_second_announcements(nodes: list[SimNode]) -> None:
    msg, members = _announce(nodes, n=8)
    m = members[0].member
    # The aggregator may not choose its own grouping: swap two members across groups.
    (g0, g1) = msg.groups
    regrouped = (tuple(sorted((g1[0], *g0[1:]))), tuple(sorted((g0[0], *g1[1:]))))
    assert _refusal(m, msg.sender, dataclasses.replace(msg, groups=regrouped)) == "bad_grouping"
    assert _refusal(m, "someone-else", msg) == "sender_mismatch"
    assert m.on_message(msg.sender, msg) == []
    assert m.on_message(msg.sender, msg) == []  # duplicate delivery is harmless
    again = dataclasses.replace(msg, session=b"\x01" * 16)
    assert _refusal(m, msg.sender, again) == "second_announcement"


def test_member_retry_and_unmask_rules(nodes: list[SimNode]) -> None:
    msg, members = _announce(nodes)
    me, peers = members[0], [p for p in msg.participants if p != members[0].peer_id]
    m = me.member
    assert m.on_message(msg.sender, msg) == []  # waits for its update
    (out,) = m.set_update(1, np.zeros(8, np.float32))
    assert isinstance(out.message, MaskedUpdate) and out.to == (msg.sender,)
    head = {"sender": msg.sender, "round": 1, "session": msg.session, "group": 0}
    same = tuple(sorted(msg.participants))
    bigger_members = GroupRetry(**head, attempt=1, members=same)
    assert _refusal(m, msg.sender, bigger_members) == "bad_members"
    without_me = GroupRetry(**head, attempt=1, members=tuple(sorted(peers)))
    assert _refusal(m, msg.sender, without_me) == "bad_members"
    three = tuple(sorted([me.peer_id, *peers[:2]]))
    (out,) = m.on_message(msg.sender, GroupRetry(**head, attempt=1, members=three))
    assert isinstance(out.message, MaskedUpdate) and out.message.attempt == 1
    stale = GroupRetry(**head, attempt=1, members=three)
    assert _refusal(m, msg.sender, stale) == "stale_attempt"
    assert _refusal(m, msg.sender, UnmaskRequest(**head, attempt=0, members=same)) == "bad_unmask"
    assert _refusal(m, msg.sender, UnmaskRequest(**head, attempt=1, members=same)) == "bad_unmask"
    (rev,) = m.on_message(msg.sender, UnmaskRequest(**head, attempt=1, members=three))
    assert isinstance(rev.message, MaskReveal)
    # Never a retry after a reveal: A would hold two unmaskable sums of our update.
    smaller = GroupRetry(**head, attempt=2, members=three)
    assert _refusal(m, msg.sender, smaller) == "already_revealed"
    wrong = dataclasses.replace(UnmaskRequest(**head, attempt=1, members=three), group=1)
    assert _refusal(m, msg.sender, wrong) == "unknown_session"
    m.forget_before(2)
    assert _refusal(m, msg.sender, smaller) == "unknown_session"


def test_member_with_wrong_dimension_refuses(nodes: list[SimNode]) -> None:
    msg, members = _announce(nodes)
    m = members[0].member
    m.on_message(msg.sender, msg)
    assert m.set_update(1, np.zeros(9, np.float32)) == []
    assert m.refused == {"wrong_dim": 1}


# ------------------------------------------------------------ aggregator rejects


def test_aggregator_counts_bad_messages_and_never_sums_them(nodes: list[SimNode]) -> None:
    a, members = nodes[0], _fresh(nodes[1:5])
    agg = AggregatorRound(
        SecureSettings(FED, group_size=4, clip=CLIP),
        aggregator=a.peer_id,
        round=1,
        dim=8,
        keys={m.peer_id: m.key.announcement for m in members},
    )
    (announce,) = agg.start(0.0)
    m0 = members[0]
    m0.member.on_message(a.peer_id, announce.message)  # type: ignore[arg-type]
    (out,) = m0.member.set_update(1, np.ones(8, np.float32))
    good = out.message
    assert isinstance(good, MaskedUpdate)
    outsider = nodes[10].peer_id
    cases = {
        "sender_mismatch": (members[1].peer_id, good),
        "wrong_session": (m0.peer_id, dataclasses.replace(good, session=b"x" * 16)),
        "not_a_member": (outsider, dataclasses.replace(good, sender=outsider)),
        "wrong_dim": (m0.peer_id, dataclasses.replace(good, masked=np.zeros(9, np.uint32))),
        "wrong_phase": (m0.peer_id, MaskReveal(**_head(good), attempt=0, seed=b"s" * 32)),
    }
    for reason, (sender, msg) in cases.items():
        assert agg.on_message(sender, msg, 1.0) == []
        assert agg.rejections.get(reason) == 1, reason
    assert agg.on_message(m0.peer_id, good, 1.0) == []
    assert agg.on_message(m0.peer_id, good, 1.0) == []
    assert agg.rejections["duplicate"] == 1 and agg.stats.rejected == 6


def _head(msg: MaskedUpdate) -> dict[str, object]:
    return {"sender": msg.sender, "round": msg.round, "session": msg.session, "group": msg.group}


# ----------------------------------------------------------------- payloads, stats


def test_payload_validation_and_size_estimate() -> None:
    head = {"sender": "a", "round": 1, "session": b"s" * 16, "group": 0, "attempt": 0}
    with pytest.raises(ValueError):
        MaskedUpdate(**head, masked=np.zeros(4, np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GroupRetry(**head, members=("b", "a", "c"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GroupRetry(**head, members=("a", "b"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MaskReveal(**{**head, "attempt": 99}, seed=b"s" * 32)  # type: ignore[arg-type]
    msg = MaskedUpdate(**head, masked=np.zeros(1000, np.uint32))  # type: ignore[arg-type]
    assert 4000 < wire_size(msg) < 4200


def test_stats_merge() -> None:
    total = SecureStats()
    total.merge(SecureStats(groups_formed=2, retries=1, bytes_in=10))
    total.merge(SecureStats(groups_formed=1, bytes_in=5))
    assert total.as_dict()["groups_formed"] == 3 and total.bytes_in == 15 and total.retries == 1


def test_announcement_with_unusable_parameters_cannot_even_be_built(
    nodes: list[SimNode],
) -> None:
    msg, _ = _announce(nodes)
    bad_changes: list[dict[str, object]] = [
        {"clip": 1e-30},  # would make the fixed-point scale overflow float32
        {"clip": float("nan")},
        {"group_size": 2},
        {"keys": msg.keys[:-1]},
        {"groups": ((0, 1),)},
        {"participants": tuple(reversed(msg.participants))},
        {"session": b"short"},
    ]
    for change in bad_changes:
        with pytest.raises(ValueError):
            dataclasses.replace(msg, **change)  # type: ignore[arg-type]
