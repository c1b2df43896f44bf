"""What the aggregator (and colluders) can learn: only group sums.

Chi-square tests use p > 1e-6 as "uniform" (a false failure once in a million runs) and
each comes with a control showing the same statistic catches structure.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from p2pfl.secure.masking import (
    MaskContext,
    SumRejected,
    add_streams,
    expand,
    fixed_point,
    pair_seed,
)
from p2pfl.secure.messages import GroupAnnounce, MaskedUpdate, MaskReveal
from p2pfl.secure.protocol import AggregatorRound, SecureSettings, Send
from p2pfl.secure.simulate import SimNode, make_nodes, run_round

FED = "fed"
D = 1 << 16  # 256 KiB of masked bytes: 1024 expected per byte value
UNIFORM_P = 1e-6
DIM = 4096  # late-vector test: 16 KiB, 64 expected per byte value


def _byte_p_value(v: np.ndarray) -> float:
    counts = np.bincount(np.ascontiguousarray(v).view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


def _structured_updates(nodes: list[SimNode]) -> dict[str, np.ndarray]:
    """Very non-uniform updates: zeros, a constant, a ramp, ..."""
    ramp = np.linspace(-1, 1, D, dtype=np.float32)
    return {
        n.peer_id: (ramp * i if i % 2 else np.zeros(D, np.float32)) for i, n in enumerate(nodes)
    }


def _round_with_transcript(
    nodes: list[SimNode], g: int
) -> tuple[AggregatorRound, list[tuple[str, object]], dict[str, np.ndarray]]:
    settings = SecureSettings(FED, group_size=g, clip=4.0)
    updates = _structured_updates(nodes[1:])
    transcript: list[tuple[str, object]] = []
    result, agg = run_round(settings, nodes[0], nodes[1:], updates, transcript=transcript)
    assert result.stats.groups_completed == 1
    return agg, transcript, updates


def test_a_single_masked_vector_is_indistinguishable_from_uniform() -> None:
    nodes = make_nodes(4, FED)
    _agg, transcript, updates = _round_with_transcript(nodes, 3)
    masked = [m.masked for _, m in transcript if isinstance(m, MaskedUpdate)]
    assert len(masked) == 3
    for v in masked:
        assert _byte_p_value(v) > UNIFORM_P
    # Control: the same member's unmasked encoding is glaringly non-uniform.
    plain = fixed_point(4.0, 3).encode(next(iter(updates.values())))
    assert _byte_p_value(plain) < 1e-12


def test_aggregator_with_g_minus_2_colluders_learns_nothing_about_an_honest_update() -> None:
    g = 4
    nodes = make_nodes(g + 1, FED)
    agg, transcript, updates = _round_with_transcript(nodes, g)
    by_id = {n.peer_id: n for n in nodes}
    members = agg.grouping[0]
    honest, colluders = members[:2], members[2:]  # g - 2 colluding members + A
    masked = {s: m.masked for s, m in transcript if isinstance(m, MaskedUpdate)}
    revealed = {s: m.seed for s, m in transcript if isinstance(m, MaskReveal)}
    ctx = MaskContext(FED, agg.round, agg.aggregator, agg.session, 0, 0)

    def strip(target: str, knowers: tuple[str, ...]) -> np.ndarray:
        """Remove from target's vector every mask the coalition `knowers` can compute."""
        v = np.array(masked[target], copy=True)
        add_streams(v, minus=[revealed[target]])  # A saw the self-mask seed revealed
        for c in knowers:
            seed = pair_seed(by_id[c].key, target, by_id[target].key.public_bytes, ctx)
            if target < c:
                add_streams(v, minus=[seed])
            else:
                add_streams(v, plus=[seed])
        return v

    codec = fixed_point(4.0, g)
    residuals = [strip(h, colluders) for h in honest]
    for h, r in zip(honest, residuals, strict=True):
        # All that is left of h's update is its encoding plus the honest pair's mask:
        # uniform, even though the update itself is all zeros or a ramp.
        assert _byte_p_value(r) > UNIFORM_P
        assert not np.array_equal(r, codec.encode(updates[h]))
    # What the coalition does learn is the honest members' sum, as designed.
    np.testing.assert_array_equal(
        residuals[0] + residuals[1],
        codec.encode(updates[honest[0]]) + codec.encode(updates[honest[1]]),
    )
    # Control: with g - 1 colluders the same construction does recover the update.
    exposed = strip(honest[0], (honest[1], *colluders))
    np.testing.assert_array_equal(exposed, codec.encode(updates[honest[0]]))
    assert _byte_p_value(exposed) < 1e-12


def test_a_late_vector_of_a_superseded_attempt_reveals_nothing() -> None:
    """Without self-masks, retrying with survivors would leak the late member's update."""
    nodes = make_nodes(5, FED)
    a, members = nodes[0], nodes[1:]
    settings = SecureSettings(FED, group_size=4, clip=4.0)
    rng = np.random.default_rng(1)
    updates = {n.peer_id: rng.uniform(-1, 1, DIM).astype(np.float32) for n in members}
    agg = AggregatorRound(
        settings,
        aggregator=a.peer_id,
        round=1,
        dim=DIM,
        keys={n.peer_id: n.key.announcement for n in members},
    )
    (announce,) = agg.start(0.0)
    assert isinstance(announce.message, GroupAnnounce)
    slow, fast = members[0], members[1:]
    attempt0: dict[str, np.ndarray] = {}
    self_seeds0: dict[str, bytes] = {}

    def answer(node: SimNode, msg: object) -> list[Send]:
        assert isinstance(msg, GroupAnnounce)
        node.member.on_message(a.peer_id, msg)
        out = node.member.set_update(1, updates[node.peer_id])
        (send,) = out
        assert isinstance(send.message, MaskedUpdate)
        attempt0[node.peer_id] = send.message.masked
        self_seeds0[node.peer_id] = node.member._sessions[(a.peer_id, 1)].self_seed
        return out

    held = answer(slow, announce.message)  # computed, but delivered only after the retry
    for node in fast:
        for s in answer(node, announce.message):
            agg.on_message(node.peer_id, s.message, 0.0)  # type: ignore[arg-type]
    (retry,) = agg.on_timeout(settings.collect_timeout)
    assert retry.to == tuple(sorted(n.peer_id for n in fast))
    pending = [retry]
    while pending:
        send = pending.pop()
        for dest in send.to:
            node = next(n for n in fast if n.peer_id == dest)
            for out in node.member.on_message(a.peer_id, send.message):  # type: ignore[arg-type]
                pending += agg.on_message(dest, out.message, 1.0)  # type: ignore[arg-type]
    result = agg.result()
    assert result.counts == (3,) and agg.stats.retries == 1
    agg.on_message(slow.peer_id, held[0].message, 2.0)  # type: ignore[arg-type]
    assert agg.stats.late == 1 and agg.result().counts == (3,)

    # A curious aggregator sums the complete attempt-0 set anyway: self-masks block it.
    codec = fixed_point(4.0, 4)
    total0 = sum(attempt0.values(), start=np.zeros(DIM, dtype=np.uint32))
    assert _byte_p_value(total0) > UNIFORM_P
    with pytest.raises(SumRejected):
        codec.decode_mean(total0, 4)
    # Control: had the self-masks been absent (i.e. known), the difference attack works.
    unmasked0 = np.array(total0, copy=True)
    add_streams(unmasked0, minus=list(self_seeds0.values()))
    sum_all = codec.decode_mean(unmasked0, 4).astype(np.float64) * 4
    sum_fast = result.means[0].astype(np.float64) * 3
    np.testing.assert_allclose(sum_all - sum_fast, updates[slow.peer_id], atol=1e-5)


def test_expanded_mask_bytes_are_uniform() -> None:
    assert _byte_p_value(expand(b"\x01" * 32, D)) > UNIFORM_P
