"""A neighbour that floods bad or duplicate models within one round costs counters, not
memory: the round's report keeps a bounded list of what was rejected."""

from __future__ import annotations

import numpy as np

from p2pfl.aggregation import mean
from p2pfl.protocol import (
    Aggregated,
    GossipMachine,
    GossipSettings,
    Rejected,
    RoundMachine,
    RoundSettings,
)
from p2pfl.protocol.rounds import REJECTIONS_KEPT

D = 4
FLOOD = 10 * REJECTIONS_KEPT


def test_a_duplicate_flood_keeps_a_bounded_report_in_the_rounds() -> None:
    m = RoundMachine(params=np.zeros(D, np.float32), rule=mean, settings=RoundSettings())
    m.start(0.0, ["a", "b"])
    m.trained(0.0, 0, np.zeros(D, np.float32), 1, ["a", "b"])
    m.receive_update(0.0, "a", 0, np.ones(D, np.float32), 1)
    seen = 0
    for _ in range(FLOOD):
        seen += sum(
            isinstance(x, Rejected)
            for x in m.receive_update(0.0, "a", 0, np.ones(D, np.float32), 1)
        )
    assert seen == FLOOD  # every one is still reported (counted) as it comes
    done = next(
        a for a in m.receive_update(0.0, "b", 0, np.ones(D, np.float32), 1)
        if isinstance(a, Aggregated)
    )  # fmt: skip
    assert len(done.rejected) == REJECTIONS_KEPT


def test_a_flood_keeps_a_bounded_report_in_the_asynchronous_mode() -> None:
    m = GossipMachine(
        params=np.zeros(D, np.float32), rule=mean, settings=GossipSettings(min_inputs=0)
    )
    m.start(0.0, ["a"])
    for _ in range(FLOOD):
        m.receive_update(0.0, "a", 0, np.full(D, np.nan, np.float32), 1)
    done = next(
        a for a in m.trained(0.0, 0, np.zeros(D, np.float32), 1, ["a"]) if isinstance(a, Aggregated)
    )
    assert len(done.rejected) == REJECTIONS_KEPT
