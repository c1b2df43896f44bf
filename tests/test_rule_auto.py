"""The default rule, `auto`: the mean while a node tolerates no one, the recommended
robust rule (centred clipping with the radius floor and the far-outlier cut) as soon as
it tolerates f > 0, so `--tolerate 3` alone buys robustness. An explicit mean with
f > 0 protects nothing, and says so."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from p2pfl.aggregation import make_rule, registry, resolve_rule
from p2pfl.config import NodeConfig
from p2pfl.scenario.schema import parse_scenario


def test_auto_is_the_mean_without_f_and_the_recommended_rule_with_it() -> None:
    assert NodeConfig().aggregation == "auto"
    assert make_rule("auto").name == "mean"
    robust = make_rule("auto", f=3)
    assert robust.name == "centered_clipping"
    assert robust.options == {"spread": 2.0, "reject": 1.5}
    assert robust.need == 7  # an honest majority: 2f + 1
    # The user's options go over the recommended ones.
    assert resolve_rule("auto", 3, {"reject": 2.0}) == (
        "centered_clipping",
        {"spread": 2.0, "reject": 2.0},
    )
    assert resolve_rule("median", 3, {}) == ("median", {})
    with pytest.raises(ValueError, match="auto, mean, median"):
        make_rule("average")


def test_tolerate_alone_outvotes_a_far_attacker() -> None:
    rng = np.random.default_rng(0)
    own = rng.standard_normal(1000).astype(np.float32)
    honest = own + 0.1 * rng.standard_normal((6, 1000)).astype(np.float32)
    attacker = own - 50.0 * (honest.mean(axis=0) - own)  # sign-flip, scaled
    x = np.vstack([own, honest, attacker[None, :]])
    w = np.ones(len(x))
    target = np.vstack([own, honest]).mean(axis=0)
    default = make_rule(NodeConfig().aggregation, f=1)(x, w, own)
    plain_mean = make_rule("mean")(x, w, own)
    assert np.linalg.norm(default - target) < 0.1 * np.linalg.norm(plain_mean - target)


def test_an_explicit_mean_with_f_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(registry, "_warned_mean", [])
    with caplog.at_level(logging.WARNING, logger="p2pfl.aggregation"):
        make_rule("mean", f=4)
        make_rule("mean", f=4)
        make_rule("mean")
        make_rule("auto", f=2)
    warned = [r for r in caplog.records if "outvotes no one" in r.getMessage()]
    assert len(warned) == 1 and "tolerate = 4" in warned[0].getMessage()


def test_a_scenario_with_f_and_no_rule_gets_the_robust_rule(tmp_path: Path) -> None:
    s = parse_scenario({"nodes": 7, "aggregation": {"f": 2}})
    assert s.aggregation.rule == "auto"
    values = s.node_config_values(
        [f"mem:n{i}" for i in range(7)], [tmp_path / f"n{i}" for i in range(7)]
    )
    assert {(v["aggregation"], v["tolerate"]) for v in values} == {("auto", 2)}
    built = make_rule(values[0]["aggregation"], f=values[0]["tolerate"])
    assert built.name == "centered_clipping"
    plain = parse_scenario({"nodes": 3}).node_config_values(
        [f"mem:n{i}" for i in range(3)], [tmp_path / f"p{i}" for i in range(3)]
    )
    assert "aggregation" not in plain[0]  # the node's own default, auto, applies
