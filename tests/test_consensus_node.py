"""The consensus step wired into the node (`[compression] consensus`, issue 15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.aggregation import make_rule, mean
from p2pfl.cli import build_parser
from p2pfl.compression import ConsensusRule, consensus_step, with_consensus
from p2pfl.config import ConfigError, NodeConfig, build_config, coerce
from p2pfl.scenario import parse_scenario
from p2pfl.scenario.inprocess import run_in_process
from p2pfl.scenario.report import build_metrics
from p2pfl.scenario.schema import ScenarioError
from p2pfl.transport.memory import MemoryNetwork

THIRTY_X = ["delta", "topk:0.03", "quantize:4", "zstd:3"]


def ring_scenario(seed: int = 0, **compression: Any) -> dict[str, Any]:
    """scenarios/ring.toml with 40 rounds (the setting of docs/compression.md)."""
    doc: dict[str, Any] = {
        "name": "ring",
        "nodes": 8,
        "rounds": 40,
        "seed": seed,
        "topology": {"kind": "ring"},
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "mlp", "hidden": 32},
        "training": {"epochs": 1, "lr": 0.05, "batch_size": 32},
        "protocol": {"neighbours": "all", "quorum": 1.0, "round_timeout": 60.0},
    }
    if compression:
        doc["compression"] = compression
    return doc


def final(doc: dict[str, Any], out: Path) -> dict[str, Any]:
    scenario = parse_scenario(doc)
    records, wall = run_in_process(scenario, out)
    metrics = build_metrics(scenario, records, wall_seconds=wall, mode="in-process")
    result: dict[str, Any] = metrics["summary"]["final"]
    return result


# ---- the rule wrapper (sans-IO) ----------------------------------------------------


def test_the_own_row_becomes_the_public_copy_and_the_step_is_consensus_step() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50)).astype(np.float32)
    own = x[1].copy()
    public = own + rng.normal(scale=0.1, size=50).astype(np.float32)
    weights = np.array([2.0, 1.0, 3.0])
    rule = ConsensusRule(mean, lambda: public, 1.0, 0.6)
    copies = x.copy()
    copies[1] = public
    want = consensus_step(mean, copies, weights, 1, own, 1.0, 0.6)
    np.testing.assert_array_equal(rule(x, weights, own), want)
    assert rule.plain_rounds == 0
    # Gamma 1 and keep = the self weight is the plain aggregate (today's rule).
    plain = ConsensusRule(mean, lambda: public, 1.0, 1.0 / 6.0)
    np.testing.assert_allclose(plain(x, weights, own), mean(x, weights, own), atol=1e-5)


def test_without_a_public_copy_the_plain_rule_runs() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    rule = ConsensusRule(mean, lambda: None, 0.5)
    np.testing.assert_array_equal(rule(x, np.ones(3), x[0]), mean(x, np.ones(3), x[0]))
    assert rule.plain_rounds == 1


def test_a_robust_rule_sees_only_public_copies_and_drops_an_outlier_copy() -> None:
    rng = np.random.default_rng(1)
    honest = rng.normal(size=(4, 30)).astype(np.float32)
    outlier = np.full((1, 30), 1e4, dtype=np.float32)
    x = np.concatenate([honest, outlier])
    own = x[0].copy()
    public = own + 0.01
    median = make_rule("median", f=1)
    wrapped = ConsensusRule(median, lambda: public, 1.0, 0.6)
    got = wrapped(x, np.ones(5), own)
    assert np.abs(got).max() < 10  # the outlier copy did not move us
    assert wrapped.name == median.name  # counters and reports read through
    assert wrapped.last_report is median.last_report


def test_off_returns_the_rule_itself() -> None:
    cfg = NodeConfig(compression=tuple(THIRTY_X)).validated()
    assert with_consensus(mean, cfg, lambda: None) is mean
    on = cfg.replace(compression_consensus=0.5).validated()
    wrapped = with_consensus(mean, on, lambda: None)
    assert isinstance(wrapped, ConsensusRule) and wrapped.gamma == 0.5 and wrapped.keep == 1.0


# ---- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"compression_consensus": 1.5}, "compression_consensus", "(0, 1]"),
        ({"compression_consensus": -0.1}, "compression_consensus", "(0, 1]"),
        ({"compression_consensus": float("nan")}, "compression_consensus", "(0, 1]"),
        ({"compression_consensus_keep": 1.2}, "compression_consensus_keep", "[0, 1]"),
        ({"compression_consensus": 0.5, "neighbours": "1"}, "compression_consensus", "all"),
        ({"compression_consensus": 0.5, "compression": ()}, "compression_consensus", "pipeline"),
    ],
)
def test_bad_values_are_refused_in_one_line(fields: dict[str, Any], field: str, words: str) -> None:
    values: dict[str, Any] = {"compression": tuple(THIRTY_X), **fields}
    with pytest.raises(ConfigError) as info:
        NodeConfig(**values).validated()
    assert info.value.field == field
    assert words in str(info.value) and "\n" not in str(info.value)


def test_flags_and_scenario_keys_reach_the_node_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["node", "--compression", "delta", "--compression-consensus", "0.8",
         "--compression-consensus-keep", "0.6"]
    )  # fmt: skip
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = build_config({}, coerce(flags, source="command line"))
    assert (cfg.compression_consensus, cfg.compression_consensus_keep) == (0.8, 0.6)
    sc = parse_scenario(ring_scenario(pipeline=THIRTY_X, consensus=1.0, consensus_keep=0.6))
    values = sc.node_config_values(
        [f"mem:n{i}" for i in range(8)], [tmp_path / str(i) for i in range(8)]
    )
    assert {(v["compression_consensus"], v["compression_consensus_keep"]) for v in values} == {
        (1.0, 0.6)
    }
    for bad, path in (
        ({"pipeline": THIRTY_X, "consensus": 2.0}, "compression.consensus"),
        ({"pipeline": THIRTY_X, "consensus_keep": -1}, "compression.consensus_keep"),
        ({"consensus": 0.5}, "compression.consensus"),
        ({"pipeline": THIRTY_X, "consensus": "yes"}, "compression.consensus"),
    ):
        with pytest.raises(ScenarioError) as err:
            parse_scenario(ring_scenario(**bad))
        assert err.value.path == path


# ---- real nodes ----------------------------------------------------------------------


async def test_every_neighbour_holds_the_public_copy_the_step_uses(tmp_path: Path) -> None:
    """The premise of the step: the node's own x_hat (the outbox's) is bit for bit what
    each neighbour decoded of it; and the nodes end in agreement."""
    nodes = make_nodes(
        tmp_path,
        3,
        MemoryNetwork(),
        rounds=6,
        partition="dirichlet",
        alpha=0.5,
        compression=("delta", "topk:0.05", "quantize:8"),
        compression_keyframe_every=0,
        compression_consensus=1.0,
        compression_consensus_keep=0.6,
    )
    for node in nodes:  # keep the copies when the links close at the end
        node._decoder.forget = lambda peer: None  # type: ignore[method-assign]
    await run_until_done(nodes)
    for node in nodes:
        own = node.outbox.public_copy()
        assert own is not None
        for other in nodes:
            if other is not node:
                assert other._decoder.round_of(node.id) == node.outbox._shared.last_round
                held = other._decoder._copies[node.id].x_hat
                np.testing.assert_array_equal(held, own)
        rule = node.machine.rule  # FedAvg: no outer optimizer around it
        assert isinstance(rule, ConsensusRule) and rule.plain_rounds == 0
    accs = [node.history[-1]["accuracy"] for node in nodes]
    assert min(accs) > 0.8, accs


def test_off_by_default_reproduces_the_documented_compressed_ring(tmp_path: Path) -> None:
    """Without `consensus` a compressed ring runs exactly as before the step existed:
    the numbers docs/compression.md recorded for seed 0 (0.9279 mean, 0.9109 worst)."""
    got = final(ring_scenario(pipeline=THIRTY_X, keyframe_every=50), tmp_path / "off")
    assert (round(got["accuracy_mean"], 4), round(got["accuracy_min"], 4)) == (0.9279, 0.9109)
    zero = final(
        ring_scenario(pipeline=THIRTY_X, keyframe_every=50, consensus=0.0), tmp_path / "zero"
    )
    learning = [k for k in got if k.startswith(("accuracy", "loss"))]
    assert learning and {k: zero[k] for k in learning} == {k: got[k] for k in learning}


def test_the_step_improves_the_compressed_ring(tmp_path: Path) -> None:
    """Ring, Dirichlet 0.5, 30x: gamma 1, keep 0.6 ends above plain aggregation, on the
    mean and on the worst node (seed 0; docs/compression.md has three seeds)."""
    plain = final(ring_scenario(pipeline=THIRTY_X, keyframe_every=50), tmp_path / "plain")
    step = final(
        ring_scenario(pipeline=THIRTY_X, keyframe_every=50, consensus=1.0, consensus_keep=0.6),
        tmp_path / "step",
    )
    assert step["accuracy_mean"] > plain["accuracy_mean"] + 0.004, (step, plain)
    assert step["accuracy_min"] > plain["accuracy_min"] + 0.01, (step, plain)
