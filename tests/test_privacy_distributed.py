"""Distributed DP with secure aggregation: each group member adds a share of the noise,
the group's sum carries all of it, an update that leaves in the clear is topped up,
and status says what colluding group mates would get."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.config import NodeConfig
from p2pfl.privacy.accountant import epsilon_spent
from p2pfl.privacy.node import NodePrivacy
from p2pfl.transport.memory import MemoryNetwork

pytest.importorskip("dp_accounting")

D = 200_000
SIGMA, CLIP = 2.0, 0.5


def privacy(group_min: int, seed: int) -> NodePrivacy:
    return NodePrivacy(
        target=None,
        delta=1e-5,
        clip=CLIP,
        noise_multiplier=SIGMA,
        group_min=group_min,
        rng=np.random.default_rng(seed),
    )


def test_each_member_adds_its_share_and_the_group_sum_carries_the_full_noise() -> None:
    start = np.zeros(D, dtype=np.float32)
    members = [privacy(3, seed) for seed in range(3)]
    # No update at all: what leaves is the noise alone.
    released = [m.release(0, start, start) for m in members]
    for r in released:
        assert r.std() == pytest.approx(SIGMA * CLIP / np.sqrt(3), rel=0.01)
    assert np.sum(released, axis=0).std() == pytest.approx(SIGMA * CLIP, rel=0.01)
    # Local DP (group_min 1) adds the full noise at every node, 3x the variance in a sum.
    local = privacy(1, 9).release(0, start, start)
    assert local.std() == pytest.approx(SIGMA * CLIP, rel=0.01)


def test_an_update_in_the_clear_is_topped_up_to_the_full_noise() -> None:
    member = privacy(3, 0)
    out = member.top_up(member.release(0, np.zeros(D, np.float32), np.zeros(D, np.float32)))
    assert out.std() == pytest.approx(SIGMA * CLIP, rel=0.01)
    assert member.status()["distributed"]["topped_up_rounds"] == 1
    local = privacy(1, 0)
    x = np.ones(4, np.float32)
    assert local.top_up(x) is x  # local DP already added everything


def test_status_gives_the_epsilon_colluding_mates_would_get() -> None:
    member = privacy(3, 0)
    for r in range(4):
        member.release(r, np.zeros(10, np.float32), np.zeros(10, np.float32))
    status = member.status()
    assert status["epsilon"] == pytest.approx(epsilon_spent([(SIGMA, 4)], 1e-5), rel=1e-5)
    colluding = status["distributed"]["epsilon_if_mates_collude"]
    assert colluding == pytest.approx(epsilon_spent([(SIGMA / np.sqrt(3), 4)], 1e-5), rel=1e-5)
    assert colluding > status["epsilon"]
    assert "distributed" not in privacy(1, 0).status()


def test_config_takes_privacy_with_secure_aggregation_and_sizes_the_share() -> None:
    c = NodeConfig(dp_noise=1.0, secure_aggregation=True, secure_min_group=4, group_size=5)
    p = NodePrivacy.from_config(c.validated())
    assert p is not None and p.group_min == 4 and p.share == pytest.approx(0.25)
    p = NodePrivacy.from_config(NodeConfig(dp_noise=1.0).validated())
    assert p is not None and p.share == 1.0


async def test_a_secure_federation_with_distributed_dp_runs_and_accounts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(
        tmp_path,
        3,
        MemoryNetwork(),
        rounds=3,
        secure_aggregation=True,
        group_size=3,
        dp_noise=1.0,
        dp_clip=1.0,
    )
    await run_until_done(nodes)
    for node in nodes:
        status = node.status()
        assert status["secure"]["rounds_grouped"] == 3  # every round in a group
        dp = status["privacy"]
        assert dp["rounds"] == 3
        assert dp["distributed"]["group_min"] == 3
        assert dp["distributed"]["topped_up_rounds"] == 0
        assert dp["distributed"]["epsilon_if_mates_collude"] > dp["epsilon"]
