"""Issue 15, attacks: several attack assignments per scenario, start rounds, per-recipient
behaviour (honest_to) and the adaptive attacks (mimic, tailored)."""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import run_until_done

from p2pfl.aggregation import make_rule
from p2pfl.cli import build_parser
from p2pfl.compression import UpdateDecoder, parse_pipeline
from p2pfl.config import ConfigError, NodeConfig, coerce, to_flags
from p2pfl.learning.attacks import Attack, alie_z, make_attack, match_peers
from p2pfl.learning.datasets import Dataset
from p2pfl.node import Node
from p2pfl.node.learner import Learner
from p2pfl.node.outbox import UpdateOutbox
from p2pfl.scenario import ScenarioError, parse_scenario
from p2pfl.scenario.inprocess import build_nodes
from p2pfl.scenario.report import build_metrics
from p2pfl.supervision import Supervisor
from p2pfl.wire import codec
from p2pfl.wire.messages import CompressedModelUpdate, ModelUpdate

D = 600


def _addresses(n: int) -> list[str]:
    return [f"mem:n{i}" for i in range(n)]


def _values(doc: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    s = parse_scenario(doc)
    return s, s.node_config_values(_addresses(s.nodes), [Path(".")] * s.nodes)


# ---- scenario: several assignments ----------------------------------------------------


MIX: dict[str, Any] = {
    "nodes": 10,
    "rounds": 6,
    "attack": [
        {"kind": "alie", "nodes": [1, 2]},
        {"kind": "ipm", "fraction": 0.1, "epsilon": 0.5, "start_round": 2},
        {"kind": "sign_flip", "nodes": [5], "scale": 8, "honest_to": [0, 9]},
        {"kind": "gaussian", "fraction": 0.1, "sigma": 0.5},
    ],
}


def test_a_mix_of_attacks_becomes_per_node_config_values() -> None:
    s, values = _values(MIX)
    alie, ipm, flip, gauss = s.attacks
    assert (alie.kind, alie.nodes) == ("alie", (1, 2))
    assert (flip.kind, flip.nodes, flip.honest_to) == ("sign_flip", (5,), (0, 9))
    assert len(ipm.nodes) == len(gauss.nodes) == 1 and ipm.start_round == 2
    everyone = [i for a in s.attacks for i in a.nodes]
    assert len(set(everyone)) == 5 == len(everyone)  # disjoint
    assert s.attackers == tuple(sorted(everyone))
    assert alie.options["z"] == pytest.approx(alie_z(10, 2), abs=1e-6)  # its own count
    assert s.aggregation.f == 5  # the total attacker count
    for i, v in enumerate(values):
        attack = s.attack_of(i)
        assert s.role(i) == ("honest" if attack is None else "malicious")
        if attack is None:
            assert not any(k.startswith("attack") for k in v)
        else:
            assert v["attack"] == attack.kind and v["attack_options"] == attack.options
            assert v.get("attack_start_round", 0) == attack.start_round
            assert v["attack_colluders"] == tuple(f"mem:n{j}" for j in everyone_sorted(s, i))
        NodeConfig(**v).validated()
    assert values[5]["attack_honest_to"] == ("mem:n0", "mem:n9")
    assert "attack_honest_to" not in values[1]
    assert s.to_dict()["attacks"][2]["honest_to"] == (0, 9)


def everyone_sorted(s: Any, but: int) -> list[int]:
    return [j for j in s.attackers if j != but]


def test_fractions_are_drawn_among_nodes_no_list_names() -> None:
    # The nodes a fraction draws when alone, given explicitly to another attack: a draw
    # that ignored the lists would collide with them.
    alone = parse_scenario({"nodes": 10, "seed": 3, "attack": {"kind": "zero", "fraction": 0.2}})
    drawn = alone.attack.nodes
    assert drawn == tuple(
        sorted(random.Random("p2pfl-scenario-attack:3").sample(range(10), 2))
    )  # the single-table draw is unchanged
    mixed = parse_scenario(
        {
            "nodes": 10,
            "seed": 3,
            "attack": [
                {"kind": "zero", "fraction": 0.2},
                {"kind": "sign_flip", "nodes": list(drawn)},
            ],
        }
    )
    fraction, listed = mixed.attacks
    assert listed.nodes == drawn
    assert len(fraction.nodes) == 2 and not set(fraction.nodes) & set(drawn)
    # A fraction never picks a node some honest_to names either.
    for seed in range(20):
        s = parse_scenario(
            {
                "nodes": 6,
                "seed": seed,
                "attack": [
                    {"kind": "zero", "fraction": 0.34, "honest_to": [0]},
                    {"kind": "ipm", "fraction": 0.17},
                    {"kind": "alie", "nodes": [5], "honest_to": [1]},
                ],
            }
        )
        assert s.attackers == (2, 3, 4, 5)  # 0 and 1 are spared


def test_the_single_table_and_a_one_element_array_are_the_same_attack() -> None:
    one = {"kind": "ipm", "fraction": 0.2, "epsilon": 0.3}
    a = parse_scenario({"nodes": 10, "attack": one})
    b = parse_scenario({"nodes": 10, "attack": [one]})
    assert a.attacks == b.attacks and a.attack == b.attack
    assert parse_scenario({"nodes": 3}).attack.kind == ""
    with pytest.raises(ValueError, match=r"use \.attacks"):
        _ = parse_scenario(MIX).attack


@pytest.mark.parametrize(
    ("attack", "expected"),
    [
        (
            [{"kind": "zero", "nodes": [1, 3]}, {"kind": "ipm", "nodes": [3]}],
            "attack[1].nodes: node 3 is already an attacker in attack[0]",
        ),
        (
            [{"kind": "zero", "nodes": [1, 2, 3]}, {"kind": "ipm", "fraction": 0.6}],
            "attack[1].fraction: needs 4 nodes, but only 3",
        ),
        (
            [{"kind": "zero", "nodes": [1, 2, 3]}, {"kind": "ipm", "fraction": 0.5}],
            "attack[1].fraction: at least one node must stay honest",
        ),
        (
            [{"kind": "zero", "nodes": [0, 1, 2]}, {"kind": "ipm", "nodes": [3, 4, 5]}],
            "attack[1].nodes: at least one node must stay honest",
        ),
        ([{"nodes": [1]}], "attack[0].kind: is required"),
        ([{"kind": "zero", "nodes": [1], "typo": 1}], "attack[0].typo: "),
        ({"kind": "zero", "nodes": [1], "start_round": 4}, "attack.start_round: must be < rounds"),
        ({"kind": "zero", "nodes": [1], "start_round": -1}, "attack.start_round: must be >= 0"),
        ({"kind": "zero", "nodes": [1], "honest_to": [1]}, "attack.honest_to: lists the attack's"),
        ({"kind": "zero", "nodes": [1], "honest_to": [9]}, "attack.honest_to: expected distinct"),
        ({"kind": "label_flip", "nodes": [1], "honest_to": [0]}, "attack.honest_to: label_flip"),
        ({"kind": "tailored", "nodes": [1], "direction": "up"}, "attack.direction: "),
        ({"kind": "mimic", "nodes": [1], "warmup": 1.5}, "attack.warmup: "),
        ("sign_flip", "attack: expected a table"),
    ],
)
def test_attack_errors_name_the_table_and_key(attack: Any, expected: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"nodes": 6, "rounds": 4, "attack": attack})
    assert str(info.value).startswith(expected), str(info.value)


def test_honest_to_is_refused_with_secure_aggregation() -> None:
    with pytest.raises(ScenarioError, match="honest_to: cannot be combined with secure"):
        parse_scenario(
            {
                "nodes": 6,
                "attack": {"kind": "zero", "nodes": [1], "honest_to": [0]},
                "secure_aggregation": {"enabled": True},
            }
        )


def test_the_report_counts_every_attack_as_malicious() -> None:
    s = parse_scenario(MIX)
    accuracy = {i: 0.1 if s.role(i) == "malicious" else 0.8 + 0.01 * i for i in range(10)}
    nodes = {
        f"n{i}": {"peer_id": f"p{i}", "rounds": [{"round": 0, "accuracy": accuracy[i]}]}
        for i in range(10)
    }
    m = build_metrics(s, nodes, wall_seconds=1.0, mode="test")
    assert m["summary"]["malicious_nodes"] == [f"n{i}" for i in s.attackers]
    honest = [accuracy[i] for i in range(10) if i not in s.attackers]
    assert m["summary"]["final"]["accuracy_mean"] == pytest.approx(np.mean(honest))


def test_attack_fields_survive_the_command_line() -> None:
    _, values = _values(MIX)
    v = {k: values[5][k] for k in values[5] if k.startswith("attack")} | {"data_dir": "x"}
    args = build_parser().parse_args(["node", *to_flags(v)])
    back = coerce({k: a for k, a in vars(args).items() if k not in ("command", "config")})
    for key in ("attack", "attack_honest_to", "attack_colluders"):
        assert back[key] == v[key], key
    _, values = _values(MIX)
    ipm = next(v for v in values if v.get("attack") == "ipm")
    args = build_parser().parse_args(["node", *to_flags({"attack_start_round": 2})])
    assert coerce({"attack_start_round": args.attack_start_round}) == {"attack_start_round": 2}
    assert ipm["attack_start_round"] == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"attack_honest_to": ("mem:n0",)}, "attack_honest_to"),
        ({"attack": "zero", "attack_start_round": -1}, "attack_start_round"),
        ({"attack": "label_flip", "attack_honest_to": ("mem:n0",)}, "attack_honest_to"),
        (
            {"attack": "zero", "attack_honest_to": ("x",), "secure_aggregation": True},
            "attack_honest_to",
        ),
    ],
)
def test_node_config_refuses_inconsistent_attack_fields(
    changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(**changes).validated()
    assert info.value.field == field


# ---- crafting --------------------------------------------------------------------------


def test_start_round_makes_the_attack_honest_before_it() -> None:
    attack = make_attack("sign_flip", start_round=3)
    assert [attack.active(r) for r in range(5)] == [False, False, False, True, True]
    with pytest.raises(ValueError, match="start_round"):
        make_attack("zero", start_round=-2)


def test_match_peers_by_id_or_listen_address() -> None:
    known = {"id-a": {"mem:n0"}, "id-b": {"127.0.0.1:7001", "10.0.0.2:7001"}}
    peers = ["id-a", "id-b", "id-c"]
    assert match_peers(["mem:n0"], peers, known) == {"id-a"}
    assert match_peers(["10.0.0.2:7001", "id-c"], peers, known) == {"id-b", "id-c"}
    assert match_peers([], peers, known) == frozenset()
    assert match_peers(["mem:n9"], peers, known) == frozenset()


def _spread(seed: int, scales: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Honest deltas = common direction + scale_i * one principal direction + noise."""
    rng = np.random.default_rng(seed)
    common = 0.05 * rng.standard_normal(D)
    axis = rng.standard_normal(D)
    axis /= np.linalg.norm(axis)
    noise = 0.002 * rng.standard_normal((len(scales), D))
    return common + np.outer(scales, axis) + noise, axis, common


def _mimic(attack: Attack, start: np.ndarray, heard: np.ndarray, senders: list[str]) -> Any:
    out = attack.craft(
        start=start,
        trained=start + 0.01,
        overheard=heard,
        rng=np.random.default_rng(0),
        senders=senders,
    )
    assert out is not None
    return out.astype(np.float64) - start


def test_mimic_copies_the_most_heterogeneous_neighbour_then_keeps_it() -> None:
    start = np.zeros(D, dtype=np.float32)
    senders = ["a", "b", "c", "d", "e"]
    heard, axis, _ = _spread(1, [-2.0, -0.5, 0.0, 0.5, 3.0])
    attack = make_attack("mimic", options={"warmup": 2})
    # Nothing overheard yet (round 0): it sends its own honest delta.
    nothing = attack.craft(
        start=start, trained=start + 0.25, overheard=None, rng=np.random.default_rng(0)
    )
    assert nothing is not None and np.allclose(nothing, 0.25)
    first = _mimic(attack, start, heard, senders)
    # z is the spread's principal axis (either sign): the copy is one of its extremes.
    assert abs(float(attack.state.z @ axis)) > 0.99
    target = attack.state.target
    assert target in ("a", "e")
    np.testing.assert_allclose(first, heard[senders.index(target)], atol=1e-6)
    # Warm-up round 2: the same spread with the neighbours' roles swapped follows the
    # extreme; after warm-up the target stays, whatever it sends.
    swapped = heard[::-1].copy()
    second = _mimic(attack, start, swapped, senders)
    target2 = attack.state.target
    assert target2 == {"a": "e", "e": "a"}[target]
    np.testing.assert_allclose(second, swapped[senders.index(target2)], atol=1e-6)
    third = _mimic(attack, start, heard, senders)
    assert attack.state.target == target2
    np.testing.assert_allclose(third, heard[senders.index(target2)], atol=1e-6)
    # A round without the target: another neighbour is chosen.
    rest = [s for s in senders if s != target2]
    fourth = _mimic(attack, start, heard[[senders.index(s) for s in rest]], rest)
    assert attack.state.target in rest
    assert any(np.allclose(fourth, heard[senders.index(s)], atol=1e-6) for s in rest)


def test_tailored_adapts_its_strength_to_the_rule() -> None:
    """Against the mean it pushes as far as its search goes; against a trimmed mean
    and the median it stays where the rule still feels it, and moves the aggregate
    further than ALIE's fixed z does; against Krum it goes as far as Krum still
    selects it."""
    rng = np.random.default_rng(5)
    start = rng.standard_normal(D).astype(np.float32)
    heard = (0.1 * rng.standard_normal(D) + 0.05 * rng.standard_normal((8, D))).astype(np.float32)
    mu = heard.astype(np.float64).mean(axis=0)
    sd = heard.astype(np.float64).std(axis=0)
    n, f = 10, 2

    def gamma_and_shift(rule_name: str, kind: str = "tailored") -> tuple[float, float]:
        rule = make_rule(rule_name, f=f)
        attack = make_attack(kind, n=n, f=f, rule=rule)
        out = attack.craft(start=start, trained=start, overheard=heard, rng=rng)
        assert out is not None
        delta = out.astype(np.float64) - start
        gamma = float(np.median((mu - delta) / sd))
        x = np.concatenate([start + heard, np.repeat(out[None], f, axis=0)])
        agg = make_rule(rule_name, f=f)(x, np.ones(n), (start + mu).astype(np.float32))
        return gamma, float(np.linalg.norm(agg - (start + mu)))

    assert make_attack("tailored", f=f).options["copies"] == f
    g_mean, _ = gamma_and_shift("mean")
    assert g_mean > 19.0  # 10 + 5 + 2.5 + ...: the deviation kept growing
    for rule in ("trimmed_mean", "median"):
        g, shift = gamma_and_shift(rule)
        _, alie_shift = gamma_and_shift(rule, "alie")
        assert 0 < g < g_mean, rule
        assert shift > 1.5 * alie_shift, (rule, shift, alie_shift)
    g_krum, krum_shift = gamma_and_shift("krum")
    assert 0 < g_krum < g_mean
    assert krum_shift == pytest.approx(g_krum * float(np.linalg.norm(sd)), rel=1e-3)  # picked
    _, alie_shift = gamma_and_shift("krum", "alie")
    assert krum_shift > 2 * alie_shift


def test_tailored_directions() -> None:
    rng = np.random.default_rng(2)
    start = np.zeros(D, dtype=np.float32)
    heard = (0.1 + 0.05 * rng.standard_normal((6, D))).astype(np.float32)
    mu = heard.astype(np.float64).mean(axis=0)
    for direction, p in (("sign", np.sign(mu)), ("unit", mu / np.linalg.norm(mu))):
        attack = make_attack("tailored", options={"direction": direction, "copies": 2})
        out = attack.craft(start=start, trained=start, overheard=heard, rng=rng)
        assert out is not None
        gamma = (mu - out.astype(np.float64)) / p
        assert np.allclose(gamma, gamma[0], atol=1e-3) and gamma[0] > 0, direction


# ---- the learner: labels and models around start_round --------------------------------


async def test_label_flip_poisons_training_only_from_its_start_round(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int64)
    data = Dataset("toy", x, y, x[:8], y[:8], 3)
    config = NodeConfig(
        data_dir=tmp_path, model="softmax", attack="label_flip", attack_start_round=2
    )
    learner = Learner(
        config,
        model=None,
        data=data,
        supervisor=Supervisor(logging.getLogger("test"), time.monotonic),
        counters=Counter(),
        threaded=False,
    )
    seen: list[np.ndarray] = []
    fit = learner.model.fit

    def recording_fit(x: np.ndarray, y: np.ndarray, **kw: Any) -> float:
        seen.append(np.array(y))
        return fit(x, y, **kw)

    learner.model.fit = recording_fit  # type: ignore[method-assign]
    params = learner.model.get_params()
    for r in range(4):
        learner.round_started(r, params)
        trained, _ = await learner.train(r, params)
        # label_flip sends its training as it is (poisoned through its labels)
        np.testing.assert_array_equal(learner.outgoing(r, trained), trained)
    np.testing.assert_array_equal(seen[0], y)
    np.testing.assert_array_equal(seen[1], y)
    np.testing.assert_array_equal(seen[2], 2 - y)
    np.testing.assert_array_equal(seen[3], 2 - y)


# ---- the outbox: one payload for all, or some peers get another model ------------------


def test_outbox_sends_the_other_model_to_the_named_peers_only() -> None:
    crafted = np.full(D, -1.0, dtype=np.float32)
    honest = np.full(D, 2.0, dtype=np.float32)
    box = UpdateOutbox("me", None, per_peer=False)
    out = box.payloads(0, crafted, 5, ["a", "b", "c"], instead={"b": honest})
    assert out["a"] is out["c"]  # the crafted model is still encoded once
    decoded = {p: codec.decode(payload) for p, payload in out.items()}
    assert all(isinstance(m, ModelUpdate) for m in decoded.values())
    np.testing.assert_array_equal(decoded["b"].params, honest)  # type: ignore[union-attr]
    np.testing.assert_array_equal(decoded["a"].params, crafted)  # type: ignore[union-attr]
    assert box.resend("b", 0) == out["b"]
    box.peer_connected("b")  # reconnected: its payload is made again, still the honest one
    again = codec.decode(box.resend("b", 0) or b"")
    np.testing.assert_array_equal(again.params, honest)  # type: ignore[union-attr]
    # Without `instead`, an honest node's path: one payload object for everyone.
    plain = box.payloads(1, crafted, 5, ["a", "b"])
    assert plain["a"] is plain["b"]


def test_compressed_outbox_with_another_model_uses_per_peer_streams() -> None:
    pipeline = parse_pipeline(["delta"])
    shared = UpdateOutbox("me", pipeline, per_peer=False, keyframe_every=0)
    with pytest.raises(RuntimeError, match="per-peer"):
        shared.payloads(0, np.zeros(D, np.float32), 1, ["a", "b"], instead={"a": np.ones(D)})
    box = UpdateOutbox("me", pipeline, per_peer=True, keyframe_every=0)
    decoders = {p: UpdateDecoder(D, max_frame_size=1 << 20) for p in ("a", "b")}
    for r in range(3):
        crafted = np.full(D, -float(r), dtype=np.float32)
        honest = np.full(D, float(r) + 0.5, dtype=np.float32)
        for peer, payload in box.payloads(r, crafted, 1, ["a", "b"], instead={"a": honest}).items():
            msg = codec.decode(payload)
            assert isinstance(msg, CompressedModelUpdate)
            got = decoders[peer].decode(peer, r, msg.blob)
            np.testing.assert_allclose(got, honest if peer == "a" else crafted, atol=1e-6)


# ---- end to end: a mixed-attack scenario, in process, mock clock -----------------------


class Sent:
    """Every model update each node enqueues: (sender index, recipient id, round) -> params."""

    def __init__(self, nodes: list[Node]) -> None:
        self.models: dict[tuple[int, str, int], np.ndarray] = {}
        self.outgoing: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        self.starts: dict[tuple[int, int], np.ndarray] = {}
        for i, node in enumerate(nodes):
            self._wrap(i, node)

    def _wrap(self, i: int, node: Node) -> None:
        enqueue, outgoing = node.mesh.enqueue, node.learner.outgoing
        round_started = node.learner.round_started

        def recording_enqueue(peer: str, payload: bytes, *, urgent: bool = False) -> bool:
            msg = codec.decode(payload)
            if isinstance(msg, ModelUpdate):
                self.models[(i, peer, msg.round)] = np.array(msg.params)
            return enqueue(peer, payload, urgent=urgent)

        def recording_outgoing(round: int, trained: np.ndarray) -> np.ndarray | None:
            out = outgoing(round, trained)
            self.outgoing[(i, round)] = (np.array(trained), None if out is None else np.array(out))
            return out

        def recording_round_started(round: int, params: np.ndarray) -> None:
            self.starts[(i, round)] = np.array(params)
            round_started(round, params)

        node.mesh.enqueue = recording_enqueue  # type: ignore[method-assign]
        node.learner.outgoing = recording_outgoing  # type: ignore[method-assign]
        node.learner.round_started = recording_round_started  # type: ignore[method-assign]


async def test_a_mixed_attack_scenario_runs_with_the_right_attack_on_each_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rounds = 4
    scenario = parse_scenario(
        {
            "nodes": 10,
            "rounds": rounds,
            "seed": 1,
            "data": {"dataset": "digits", "partition": "iid"},
            "aggregation": {"rule": "median"},
            "attack": [
                {"kind": "alie", "nodes": [1]},
                {"kind": "ipm", "nodes": [2], "start_round": 2},
                {"kind": "sign_flip", "nodes": [5], "scale": 8, "honest_to": [0]},
                {"kind": "tailored", "fraction": 0.1},
            ],
        }
    )
    tailored = scenario.attacks[3].nodes[0]
    assert tailored not in (1, 2, 5)
    nodes = build_nodes(scenario, tmp_path)
    sent = Sent(nodes)
    await run_until_done(nodes)

    ids = [n.id for n in nodes]
    for i, node in enumerate(nodes):
        attack = scenario.attack_of(i)
        assert node.role == scenario.role(i)
        assert (node.attack.kind if node.attack else None) == (attack.kind if attack else None)
        assert node.config.tolerate == 4 and len(node.history) == rounds
    # honest_to: node 5 sends node 0 its trained model, everyone else the flipped one.
    for r in range(rounds):
        trained, crafted = sent.outgoing[(5, r)]
        assert crafted is not None
        start = sent.starts[(5, r)].astype(np.float64)
        np.testing.assert_allclose(crafted, start - 8 * (trained - start), atol=1e-4)
        np.testing.assert_array_equal(sent.models[(5, ids[0], r)], trained)
        for j in range(1, 10):
            if j != 5:
                np.testing.assert_array_equal(sent.models[(5, ids[j], r)], crafted)
    # start_round: node 2 is honest in rounds 0 and 1, IPM from round 2.
    for r in range(rounds):
        trained, out = sent.outgoing[(2, r)]
        assert out is not None
        np.testing.assert_array_equal(sent.models[(2, ids[3], r)], out)
        assert np.array_equal(out, trained) == (r < 2), r
    # The omniscient attackers overheard the honest nodes only (not their accomplices).
    honest_ids = {ids[i] for i in range(10) if scenario.role(i) == "honest"}
    for i in (1, 2, tailored):
        assert set(nodes[i].learner._overheard_from) == honest_ids
    # The honest nodes learnt despite four attackers under the median.
    accuracy = [
        n.history[-1]["accuracy"] for i, n in enumerate(nodes) if i not in scenario.attackers
    ]
    assert min(accuracy) > 0.5, accuracy
