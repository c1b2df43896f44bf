"""Node-level DP, piece by piece: the mechanism, the accountant, the budget, the config."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfl.cli import main
from p2pfl.config import ConfigError, NodeConfig, build_config, coerce, load_config_file
from p2pfl.privacy import BudgetExhausted, PrivacyBudget, clip_update, gaussian_release
from p2pfl.privacy.accountant import epsilon_spent, noise_for_epsilon
from p2pfl.privacy.node import NodePrivacy
from p2pfl.scenario import ScenarioError, parse_scenario

dp_accounting = pytest.importorskip("dp_accounting")

# ---- the mechanism -------------------------------------------------------------------------


def test_clip_scales_a_long_update_to_the_clip_norm_and_keeps_its_direction() -> None:
    rng = np.random.default_rng(0)
    u = rng.standard_normal(10_000).astype(np.float32) * 3
    clipped, norm = clip_update(u, 0.5)
    assert norm == pytest.approx(float(np.linalg.norm(u.astype(np.float64))))
    assert np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(0.5, rel=1e-6)
    cos = float(clipped @ u) / (np.linalg.norm(clipped) * np.linalg.norm(u))
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_clip_leaves_a_short_update_alone() -> None:
    u = np.array([0.3, -0.4], np.float32)  # norm 0.5
    clipped, norm = clip_update(u, 1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped, u)
    assert clipped is not u


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf, math.nan])
def test_clip_must_be_a_positive_finite_norm(clip: float) -> None:
    with pytest.raises(ValueError, match="clip norm"):
        clip_update(np.ones(3, np.float32), clip)


def test_release_without_noise_is_start_plus_the_clipped_update() -> None:
    start = np.arange(4, dtype=np.float32)
    trained = start + np.array([3, 4, 0, 0], np.float32)  # update norm 5
    out = gaussian_release(
        start, trained, clip=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0)
    )
    np.testing.assert_allclose(out.params - start, [0.6, 0.8, 0, 0], rtol=1e-6)
    assert out.clipped and out.norm == pytest.approx(5.0)


def test_noise_has_std_noise_multiplier_times_clip() -> None:
    """A zero update, so what leaves is start + noise: its sample std must be sigma * C
    (n = 400k: the std of the sample std is ~0.11%; the bound is 1%, ~9 of those)."""
    n, sigma, clip = 400_000, 2.5, 0.4
    start = np.full(n, 7.0, np.float32)
    out = gaussian_release(
        start, start.copy(), clip=clip, noise_multiplier=sigma, rng=np.random.default_rng(1)
    )
    noise = (out.params - start).astype(np.float64)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.01)
    assert abs(noise.mean()) < 5 * sigma * clip / math.sqrt(n)
    # and not the same draw twice: a second release gets fresh noise
    again = gaussian_release(
        start, start.copy(), clip=clip, noise_multiplier=sigma, rng=np.random.default_rng(2)
    )
    assert not np.array_equal(again.params, out.params)


# ---- the accountant ------------------------------------------------------------------------


def test_epsilon_grows_with_rounds_and_matches_dp_accounting_directly() -> None:
    sigma, delta = 1.3, 1e-5
    spent = [epsilon_spent([(sigma, t)], delta) for t in (1, 2, 5, 20)]
    assert spent == sorted(spent) and len(set(spent)) == 4
    direct = dp_accounting.rdp.RdpAccountant()
    direct.compose(dp_accounting.GaussianDpEvent(sigma), 20)
    assert spent[-1] == pytest.approx(direct.get_epsilon(delta), rel=1e-12)
    assert epsilon_spent([], delta) == 0.0
    assert epsilon_spent([(0.0, 1)], delta) == math.inf


def test_a_history_of_runs_composes_like_the_rounds_one_by_one() -> None:
    direct = dp_accounting.rdp.RdpAccountant()
    for sigma in (2.0, 2.0, 2.0, 0.9, 0.9):
        direct.compose(dp_accounting.GaussianDpEvent(sigma))
    assert epsilon_spent([(2.0, 3), (0.9, 2)], 1e-6) == pytest.approx(
        direct.get_epsilon(1e-6), rel=1e-12
    )


@pytest.mark.parametrize(("epsilon", "rounds"), [(1.0, 10), (4.0, 30), (8.0, 5)])
def test_noise_derived_from_a_target_meets_it_and_is_not_much_more(
    epsilon: float, rounds: int
) -> None:
    sigma = noise_for_epsilon(epsilon, 1e-5, rounds)
    assert epsilon_spent([(sigma, rounds)], 1e-5) <= epsilon
    assert epsilon_spent([(sigma * 0.99, rounds)], 1e-5) > epsilon  # near the smallest


# ---- the budget (sans-IO) ------------------------------------------------------------------


def _linear(history: object, delta: float) -> float:
    """A stand-in accountant: each round costs 1 / sigma."""
    return sum(n / s for s, n in history)  # type: ignore[attr-defined]


def test_budget_charges_until_the_next_round_would_cross_the_target() -> None:
    budget = PrivacyBudget(target=2.5, delta=1e-5, noise_multiplier=1.0, epsilon_of=_linear)
    assert budget.spent == 0.0 and budget.remaining == 2.5 and not budget.exhausted
    assert budget.charge(0) == 1.0
    assert budget.charge(1) == 2.0
    assert budget.exhausted and budget.remaining == 0.5  # a third would spend 3 > 2.5
    with pytest.raises(BudgetExhausted, match=r"budget of 2\.5"):
        budget.charge(2)
    assert budget.spent == 2.0 and budget.rounds == 2 and budget.last_round == 1


def test_budget_state_round_trips_and_bad_state_is_refused() -> None:
    budget = PrivacyBudget(target=None, delta=1e-5, noise_multiplier=2.0, epsilon_of=_linear)
    for r in range(3):
        budget.charge(r)
    history, last = PrivacyBudget.parse_state(budget.state())
    again = PrivacyBudget(
        target=None,
        delta=1e-5,
        noise_multiplier=4.0,  # the operator changed the noise: the old runs still count
        epsilon_of=_linear,
        history=history,
        last_round=last,
    )
    assert again.spent == 1.5 and again.charge(3) == 1.75 and not again.exhausted
    for bad in ({}, {"version": 1, "history": [[1.0]]}, {"version": 1, "history": [[1, -2]]}):
        with pytest.raises(ValueError):
            PrivacyBudget.parse_state(bad)


def test_node_privacy_refuses_to_release_once_spent() -> None:
    privacy = NodePrivacy(
        target=2.0, delta=1e-5, clip=1.0, noise_multiplier=1.0, epsilon_of=_linear
    )
    start = np.zeros(5, np.float32)
    trained = np.ones(5, np.float32)
    assert privacy.release(0, start, trained) is not start
    assert privacy.release(1, start, trained) is not start
    assert privacy.release(2, start, trained) is start  # spent: the start model, uncharged
    status = privacy.status()
    assert status["epsilon"] == 2.0 and status["rounds"] == 2
    assert status["exhausted"] and status["stopped_at"] == 2


# ---- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"dp_epsilon": 0.0}, "dp_epsilon", "> 0"),
        ({"dp_epsilon": -1.0}, "dp_epsilon", "> 0"),
        ({"dp_epsilon": 4.0, "dp_delta": 0.0}, "dp_delta", "(0, 1)"),
        ({"dp_epsilon": 4.0, "dp_delta": 1.0}, "dp_delta", "(0, 1)"),
        ({"dp_epsilon": 4.0, "dp_noise": 0.0}, "dp_noise", "of any budget"),
        ({"dp_noise": 0.0}, "dp_noise", "infinite epsilon"),
        ({"dp_epsilon": 4.0, "dp_clip": 0.0}, "dp_clip", "> 0"),
        ({"dp_epsilon": 4.0, "rounds": 0}, "dp_epsilon", "rounds = 0"),
    ],
)
def test_bad_privacy_combinations_are_one_line_config_errors(
    fields: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(**fields).validated()  # type: ignore[arg-type]
    assert info.value.field == field
    assert words in str(info.value) and "\n" not in str(info.value)


def test_privacy_is_off_by_default_and_on_with_a_budget_or_a_noise() -> None:
    assert not NodeConfig().validated().privacy
    assert NodeConfig(dp_epsilon=4.0).validated().privacy
    assert NodeConfig(dp_noise=1.0, rounds=0).validated().privacy  # counts, forever
    assert NodeConfig(dp_noise=1.0, secure_aggregation=False).privacy


def test_flags_and_the_privacy_table_of_a_node_file(tmp_path: Path) -> None:
    flags = coerce({"dp_epsilon": "4", "dp_noise": "1.5"}, source="command line")
    assert flags == {"dp_epsilon": 4.0, "dp_noise": 1.5}
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text("rounds = 7\n[privacy]\nepsilon = 2\ndelta = 1e-6\nclip = 0.5\n")
    cfg = build_config(load_config_file(cfg_file), {})
    assert (cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip, cfg.dp_noise) == (2.0, 1e-6, 0.5, None)
    cfg_file.write_text("[privacy]\nepsilom = 2\n")
    with pytest.raises(ConfigError, match=r"privacy\.epsilom.*known: epsilon"):
        load_config_file(cfg_file)


def test_the_cli_reports_a_bad_budget_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--dp-epsilon", "0", "--data-dir", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2pfl node: config field 'dp_epsilon'") and "\n" not in err


def test_missing_dp_accounting_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails
    noise_for_epsilon.cache_clear()
    with pytest.raises(ConfigError, match=r"p2pfl\[dp\]") as info:
        NodePrivacy.from_config(NodeConfig(dp_epsilon=3.0).validated())
    assert info.value.field == "dp_epsilon"
    noise_for_epsilon.cache_clear()


def test_scenario_privacy_table_maps_to_the_node_fields() -> None:
    doc = {"nodes": 3, "privacy": {"epsilon": 4, "clip": 0.5}}
    s = parse_scenario(doc)
    values = s.node_config_values([f"mem:n{i}" for i in range(3)], [Path("d")] * 3)
    assert {k: values[1][k] for k in ("dp_epsilon", "dp_delta", "dp_clip", "dp_noise")} == {
        "dp_epsilon": 4.0,
        "dp_delta": 1e-5,
        "dp_clip": 0.5,
        "dp_noise": None,
    }
    plain = parse_scenario({"nodes": 3}).node_config_values(["a:1", "b:1", "c:1"], [Path()] * 3)
    assert "dp_epsilon" not in plain[0]


@pytest.mark.parametrize(
    ("privacy", "path"),
    [
        ({"epsilon": 0}, "privacy.epsilon"),
        ({"epsilon": 4, "noise": 0}, "privacy.noise"),
        ({"epsilon": 4, "delta": 2}, "privacy.delta"),
        ({"epsilon": 4, "budget": 4}, "privacy.budget"),
    ],
)
def test_scenario_privacy_errors_name_the_key(privacy: dict[str, object], path: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"nodes": 3, "privacy": privacy})
    assert info.value.path == path


def test_scenario_takes_privacy_with_secure_aggregation_as_distributed_dp() -> None:
    s = parse_scenario(
        {"nodes": 4, "privacy": {"epsilon": 4}, "secure_aggregation": {"enabled": True}}
    )
    assert s.privacy.epsilon == 4 and s.secure.enabled


def test_scenario_dp_table_is_the_privacy_table() -> None:
    s = parse_scenario({"nodes": 3, "rounds": 5, "dp": {"epsilon": 4, "clip": 0.5}})
    assert s.privacy.epsilon == 4 and s.privacy.clip == 0.5
    with pytest.raises(ScenarioError, match="another name") as info:
        parse_scenario({"nodes": 3, "dp": {"epsilon": 4}, "privacy": {"epsilon": 4}})
    assert info.value.path == "dp"
