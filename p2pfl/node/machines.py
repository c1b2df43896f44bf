"""Which state machine runs a node's learning, built from its config.

The synchronous rounds (`protocol.rounds`) or the asynchronous mode (`protocol.gossip`):
the same events and actions, so the daemon drives either; only their settings come
from different parts of the config.
"""

from __future__ import annotations

import logging

import numpy as np

from p2pfl.aggregation import AggregationRule, resolve_rule
from p2pfl.config import NodeConfig
from p2pfl.protocol import GossipMachine, GossipSettings, RoundMachine, RoundSettings

log = logging.getLogger("p2pfl.node")

Machine = RoundMachine | GossipMachine


def build_machine(
    config: NodeConfig,
    params: np.ndarray,
    rule: AggregationRule,
    *,
    round: int,
    node_id: str,
    threaded: bool,
) -> Machine:
    """`threaded`: a real node, which runs the rule in a worker thread (Aggregate)."""
    rng = np.random.default_rng([config.seed, config.node_index])
    if config.mode == "async":
        if config.outer == "fedavgm":
            # Measured (docs/heterogeneity.md): its momentum piles up the disagreement
            # between neighbours that one asynchronous mix leaves behind.
            log.warning(
                "outer = 'fedavgm' is unstable in the asynchronous mode (accuracy collapses "
                "for steps at a time at the default outer_lr); prefer 'fedavg' or 'fedadam'"
            )
        return GossipMachine(params, rule, _gossip_settings(config, threaded), round, node_id, rng)
    return RoundMachine(params, rule, _round_settings(config, threaded), round, node_id, rng)


def _rule_name(config: NodeConfig) -> str:
    """The rule the config stands for ('auto' is the mean or the robust default)."""
    return resolve_rule(config.aggregation, config.tolerate, config.aggregation_options)[0]


def _gossip_settings(config: NodeConfig, threaded: bool) -> GossipSettings:
    return GossipSettings(
        target_rounds=config.rounds,
        staleness_exponent=config.staleness_exponent,
        max_staleness=config.max_staleness,
        # A robust rule outvotes f attackers only among 2f + 1 inputs: a median of our
        # model and one attacker's is half the attacker's.
        min_inputs=max(config.min_inputs, 2 * config.tolerate),
        max_wait=config.round_timeout,
        grace=config.mix_grace,
        neighbour_count=config.neighbour_count,
        rule_name=_rule_name(config),
        defer_aggregation=threaded,
    )


def _round_settings(config: NodeConfig, threaded: bool) -> RoundSettings:
    secure = config.secure_aggregation
    return RoundSettings(
        target_rounds=config.rounds,
        quorum=config.quorum,
        round_timeout=config.round_timeout,
        neighbour_count=config.neighbour_count,
        catch_up_timeout=max(2.0, config.round_timeout / 2),
        # Secure rounds end on the secure protocol's own timeouts.
        adaptive_timeout=not secure,
        nudge_fraction=None if secure else 0.2,
        # Every member of a group forwards the same group mean: count it once.
        distinct_inputs=secure,
        rule_name=_rule_name(config),
        # The consensus step, too, needs our round's message encoded first.
        defer_aggregation=threaded or config.compression_consensus > 0,
    )
