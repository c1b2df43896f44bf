"""Each attack sends what it claims to send; the scenario [attack] and [aggregation]
tables; honest-only reporting."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pfl.config import NodeConfig
from p2pfl.learning.attacks import ATTACK_NAMES, Attack, alie_z, make_attack
from p2pfl.scenario import ScenarioError, load_scenario, parse_scenario
from p2pfl.scenario.inprocess import build_nodes
from p2pfl.scenario.report import build_metrics, summary_table

D = 4000


@pytest.fixture
def setup() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    start = rng.standard_normal(D).astype(np.float32)
    trained = (start + 0.1 * rng.standard_normal(D)).astype(np.float32)
    # Honest neighbours' deltas: a common direction plus individual noise.
    direction = 0.1 * rng.standard_normal(D)
    heard = (direction + 0.05 * rng.standard_normal((6, D))).astype(np.float32)
    return start, trained, heard


def craft(
    attack: Attack,
    start: np.ndarray,
    trained: np.ndarray,
    heard: np.ndarray | None,
    seed: int = 0,
) -> np.ndarray:
    out = attack.craft(
        start=start, trained=trained, overheard=heard, rng=np.random.default_rng(seed)
    )
    assert out is not None
    assert out.dtype == np.float32 and out.shape == start.shape and out.flags.c_contiguous
    return out


def test_names_are_the_contracted_ones() -> None:
    assert ATTACK_NAMES == (
        "sign_flip",
        "gaussian",
        "label_flip",
        "ipm",
        "alie",
        "zero",
        "random",
        "silent",
        "mimic",
        "tailored",
    )
    for kind in ATTACK_NAMES:
        assert make_attack(kind).kind == kind


def test_sign_flip_sends_the_scaled_opposite_delta(setup: tuple[np.ndarray, ...]) -> None:
    start, trained, heard = setup
    delta = trained.astype(np.float64) - start
    out = craft(make_attack("sign_flip"), start, trained, heard)
    np.testing.assert_allclose(out - start, -4.0 * delta, atol=1e-5)
    out = craft(make_attack("sign_flip", options={"scale": 1}), start, trained, heard)
    np.testing.assert_allclose(out - start, -delta, atol=1e-5)


def test_gaussian_adds_zero_mean_noise_of_sigma(setup: tuple[np.ndarray, ...]) -> None:
    start, trained, heard = setup
    attack = make_attack("gaussian", options={"sigma": 0.5})
    noise = craft(attack, start, trained, heard).astype(np.float64) - start
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 0.5) < 0.02
    # Independent of the honest update, reproducible from the generator.
    first = craft(attack, start, trained, heard)
    np.testing.assert_array_equal(craft(attack, start, trained * 3, heard), first)
    assert not np.array_equal(craft(attack, start, trained, heard, seed=1), first)


def test_label_flip_poisons_labels_and_sends_its_honest_training(
    setup: tuple[np.ndarray, ...],
) -> None:
    start, trained, heard = setup
    y = np.array([0, 1, 2, 9, 5], dtype=np.int64)
    attack = make_attack("label_flip")
    flipped = attack.poison_labels(y, 10)
    np.testing.assert_array_equal(flipped, [9, 8, 7, 0, 4])
    assert flipped.dtype == y.dtype
    np.testing.assert_array_equal(craft(attack, start, trained, heard), trained)
    for kind in ATTACK_NAMES:
        if kind != "label_flip":
            np.testing.assert_array_equal(make_attack(kind).poison_labels(y, 10), y)


def test_ipm_sends_minus_epsilon_times_the_overheard_mean(
    setup: tuple[np.ndarray, ...],
) -> None:
    start, trained, heard = setup
    honest_mean = heard.astype(np.float64).mean(axis=0)
    out = craft(make_attack("ipm", options={"epsilon": 0.5}), start, trained, heard)
    np.testing.assert_allclose(out - start, -0.5 * honest_mean, atol=1e-5)
    assert float((out - start) @ honest_mean) < 0  # points against the honest direction
    # Round 0: nothing overheard, the attacker's own delta stands in for the mean.
    delta = trained.astype(np.float64) - start
    for nothing in (None, np.empty((0, D), dtype=np.float32)):
        out = craft(make_attack("ipm"), start, trained, nothing)
        np.testing.assert_allclose(out - start, -0.1 * delta, atol=1e-5)


def test_alie_shifts_by_z_standard_deviations_and_hides_in_the_spread(
    setup: tuple[np.ndarray, ...],
) -> None:
    start, trained, heard = setup
    h = heard.astype(np.float64)
    mu, sd = h.mean(axis=0), h.std(axis=0)
    attack = make_attack("alie", n=20, f=4)
    z = attack.options["z"]
    out = craft(attack, start, trained, heard).astype(np.float64) - start
    np.testing.assert_allclose(out, mu - z * sd, atol=1e-5)
    # Closer to the honest mean than the honest updates themselves are.
    honest_dist = np.linalg.norm(h - mu, axis=1)
    assert np.linalg.norm(out - mu) < np.median(honest_dist)
    fixed = make_attack("alie", options={"z": 1.5}, n=20, f=4)
    out = craft(fixed, start, trained, heard).astype(np.float64) - start
    np.testing.assert_allclose(out, mu - 1.5 * sd, atol=1e-5)


def test_alie_z_follows_baruch_et_al() -> None:
    # z = Phi^-1((n - s) / n), s = floor(n / 2 + 1) - f
    inv = statistics.NormalDist().inv_cdf
    assert alie_z(20, 4) == pytest.approx(inv(13 / 20))  # s = 7
    assert alie_z(50, 24) == pytest.approx(inv(48 / 50))  # s = 2
    assert alie_z(10, 2) == pytest.approx(inv(6 / 10))
    assert alie_z(20, 0) == 0.0  # no attacker majority to hide behind
    assert alie_z(0, 0) == 1.0  # n unknown
    assert make_attack("alie", n=20, f=4).options["z"] == pytest.approx(0.3853, abs=1e-4)


def test_zero_random_and_silent(setup: tuple[np.ndarray, ...]) -> None:
    start, trained, heard = setup
    np.testing.assert_array_equal(craft(make_attack("zero"), start, trained, heard), start)
    noise = craft(make_attack("random", options={"scale": 0.2}), start, trained, heard) - start
    assert np.abs(noise).max() <= 0.2 + 1e-6 and noise.std() > 0.1
    silent = make_attack("silent")
    assert silent.silent
    rng = np.random.default_rng()
    assert silent.craft(start=start, trained=trained, overheard=heard, rng=rng) is None


@pytest.mark.parametrize(
    ("kind", "options", "needle"),
    [
        ("backdoor", {}, "backdoor"),
        ("sign_flip", {"sigma": 1.0}, "sigma"),
        ("gaussian", {"sigma": 0}, "sigma"),
        ("gaussian", {"sigma": "big"}, "sigma"),
        ("ipm", {"epsilon": -1}, "epsilon"),
        ("zero", {"scale": 1}, "scale"),
        ("alie", {"z": True}, "'z'"),
    ],
)
def test_bad_kinds_and_options_raise_naming_them(
    kind: str, options: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        make_attack(kind, options=options)


def test_overheard_of_the_wrong_width_is_refused(setup: tuple[np.ndarray, ...]) -> None:
    start, trained, heard = setup
    with pytest.raises(ValueError, match="shape"):
        craft(make_attack("alie"), start, trained, heard[:, :10])


# ---- scenario tables ------------------------------------------------------------------


def test_scenario_attack_and_aggregation_tables_become_node_config_values() -> None:
    s = parse_scenario(
        {
            "nodes": 10,
            "attack": {"kind": "alie", "fraction": 0.2},
            "aggregation": {"rule": "trimmed_mean", "bucket_size": 2},
        }
    )
    assert len(s.attack.nodes) == 2 and s.attack.options["z"] == pytest.approx(
        alie_z(10, 2), abs=1e-6
    )
    assert (
        s.attack
        == parse_scenario({"nodes": 10, "attack": {"kind": "alie", "fraction": 0.2}}).attack
    )
    assert (s.aggregation.rule, s.aggregation.f) == ("trimmed_mean", 2)  # f defaults to attackers
    values = s.node_config_values([f"mem:n{i}" for i in range(10)], [Path(".")] * 10)
    for i, v in enumerate(values):
        assert v["aggregation"] == "trimmed_mean" and v["tolerate"] == 2
        assert v["aggregation_options"] == {"bucket_size": 2}
        if i in s.attack.nodes:
            assert v["attack"] == "alie" and v["attack_options"] == dict(s.attack.options)
            assert s.role(i) == "malicious"
        else:
            assert "attack" not in v and s.role(i) == "honest"
        NodeConfig(**v).validated()
    explicit = parse_scenario(
        {
            "nodes": 5,
            "attack": {"kind": "sign_flip", "nodes": [3, 1], "scale": 8},
            "aggregation": {"f": 1},
        }
    )
    assert explicit.attack.nodes == (1, 3) and explicit.attack.options == {"scale": 8}
    assert explicit.aggregation.f == 1
    plain = parse_scenario({"nodes": 3}).node_config_values(
        ["mem:a", "mem:b", "mem:c"], [Path(".")] * 3
    )
    assert not any(k in plain[0] for k in ("aggregation", "tolerate", "attack"))


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"attack": {"nodes": [1]}}, "attack.kind: is required"),
        ({"attack": {"kind": "backdoor", "nodes": [1]}}, "attack.kind: unknown value"),
        ({"attack": {"kind": "zero"}}, "attack: give exactly one of"),
        ({"attack": {"kind": "zero", "nodes": [1], "fraction": 0.2}}, "attack: give exactly one"),
        ({"attack": {"kind": "zero", "nodes": [6]}}, "attack.nodes: expected distinct"),
        ({"attack": {"kind": "zero", "nodes": [1, 1]}}, "attack.nodes: expected distinct"),
        ({"attack": {"kind": "zero", "nodes": list(range(6))}}, "attack.nodes: at least one"),
        ({"attack": {"kind": "zero", "fraction": 0.01}}, "attack.fraction: makes 0 of 6"),
        ({"attack": {"kind": "sign_flip", "nodes": [1], "sigma": 1}}, "attack.sigma: "),
        ({"attack": {"kind": "gaussian", "nodes": [1], "sigma": -1}}, "attack.sigma: "),
        ({"aggregation": {"rule": "avg"}}, "aggregation.rule: unknown value"),
        ({"aggregation": {"rule": "median", "f": -1}}, "aggregation.f: must be >= 0"),
        ({"aggregation": {"rule": "trimmed_mean", "beta": 0.7}}, "aggregation.beta: "),
        ({"aggregation": {"rule": "krum", "m": 3}}, "aggregation.m: "),
        ({"aggregation": {"rule": "trimmed_mean", "f": 1, "beta": 0}}, "aggregation.beta: "),
    ],
)
def test_scenario_attack_and_aggregation_errors_name_the_field(
    doc: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"nodes": 6, **doc})
    assert str(info.value).startswith(expected), str(info.value)


def test_report_marks_roles_and_scores_honest_nodes_only() -> None:
    s = parse_scenario({"nodes": 3, "attack": {"kind": "zero", "nodes": [2]}})
    nodes = {
        f"n{i}": {"peer_id": f"p{i}", "rounds": [{"round": 1, "accuracy": acc, "bytes_sent": 10}]}
        for i, acc in enumerate((0.8, 0.6, 0.05))
    }
    m = build_metrics(s, nodes, wall_seconds=1.0, mode="test")
    assert [m["nodes"][n]["role"] for n in ("n0", "n1", "n2")] == ["honest", "honest", "malicious"]
    final = m["summary"]["final"]
    assert final["accuracy_mean"] == pytest.approx(0.7) and final["accuracy_min"] == 0.6
    assert final["bytes_sent_total"] == 30  # traffic counts everyone
    assert m["summary"]["per_round"][0]["accuracy_mean"] == pytest.approx(0.7)
    assert m["summary"]["malicious_nodes"] == ["n2"] and m["summary"]["honest_nodes"] == 2
    assert "malicious" in str(summary_table(m).title)


# ---- end to end: real nodes in one process --------------------------------------------


async def _honest_accuracy(tmp: Path, rule: str, attack: str | None) -> float:
    doc: dict[str, Any] = {
        "nodes": 10,
        "rounds": 8,
        "seed": 0,
        "data": {"dataset": "digits", "partition": "iid"},
        "training": {"epochs": 1, "lr": 0.05},
        "aggregation": {"rule": rule, "f": 2},
    }
    if attack:
        doc["attack"] = {"kind": attack, "nodes": [3, 7]}
    scenario = parse_scenario(doc)
    nodes = build_nodes(scenario, tmp / f"{rule}-{attack}")
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        for node in nodes:
            await node.done.wait()
        nursery.cancel_scope.cancel()
    assert [n.role for n in nodes].count("malicious") == (2 if attack else 0)
    honest = [n for i, n in enumerate(nodes) if scenario.role(i) == "honest"]
    assert all(len(n.history) == 8 for n in honest)
    return float(np.mean([n.history[-1]["accuracy"] for n in honest]))


async def test_two_sign_flippers_break_the_mean_but_not_the_trimmed_mean(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    clean = await _honest_accuracy(tmp_path, "mean", None)
    attacked_mean = await _honest_accuracy(tmp_path, "mean", "sign_flip")
    attacked_trimmed = await _honest_accuracy(tmp_path, "trimmed_mean", "sign_flip")
    assert clean >= 0.85, clean
    assert attacked_trimmed >= clean - 0.03, (clean, attacked_trimmed)
    assert attacked_mean <= clean - 0.15, (clean, attacked_mean)


def test_byzantine_scenario_files_parse() -> None:
    files = sorted((Path(__file__).resolve().parent.parent / "scenarios").glob("byzantine-*.toml"))
    assert len(files) >= 6
    kinds = set()
    for path in files:
        s = load_scenario(path)
        kinds.update(a.kind for a in s.attacks)
        assert s.nodes == 20 and len(s.attackers) in (0, 4)
    assert {"sign_flip", "gaussian", "label_flip", "ipm", "alie"} <= kinds
