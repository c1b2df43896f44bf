"""Outer optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) and FedProx.

The outer steps are checked against the update equations of Reddi et al. 2021
(Algorithm 2) written out independently here in float64; FedProx's gradient against
finite differences of its objective; the state through a real checkpoint file and a
node restart; the config errors; and whole in-process federations."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import msgpack
import numpy as np
import pytest
import trio
import trio.testing
from test_node_inmemory import make_nodes, run_until_done

from p2pfl.aggregation import mean
from p2pfl.cli import build_parser
from p2pfl.config import ConfigError, NodeConfig, build_config, coerce
from p2pfl.learning import Dataset
from p2pfl.learning.outer import DEFAULT_LR, OuterOptimizer
from p2pfl.learning.softmax import SoftmaxRegression
from p2pfl.node.learner import Learner
from p2pfl.scenario import parse_scenario
from p2pfl.scenario.inprocess import run_in_process
from p2pfl.scenario.report import build_metrics
from p2pfl.scenario.schema import ScenarioError
from p2pfl.storage import Checkpoint, load_checkpoint, save_checkpoint
from p2pfl.supervision import Supervisor
from p2pfl.transport.memory import MemoryNetwork

B1, B2, TAU = 0.9, 0.99, 1e-3


def reference(
    name: str, before: list[np.ndarray], aggregates: list[np.ndarray], lr: float
) -> list[np.ndarray]:
    """The paper's equations, one round at a time, in float64 (no shared code)."""
    d = before[0].shape
    m = np.zeros(d)
    v = np.full(d, TAU**2)
    out = []
    for x, agg in zip(before, aggregates, strict=True):
        delta = agg.astype(np.float64) - x
        if name == "fedavgm":
            m = B1 * m + delta
            out.append(x + lr * m)
            continue
        m = B1 * m + (1 - B1) * delta
        if name == "fedadagrad":
            v = v + delta**2
        elif name == "fedadam":
            v = B2 * v + (1 - B2) * delta**2
        else:
            v = v - (1 - B2) * delta**2 * np.sign(v - delta**2)
        out.append(x + lr * m / (np.sqrt(v) + TAU))
    return out


def rounds_of(seed: int, n: int = 4, d: int = 5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Round starts and aggregates; later rounds move less, so Yogi's v shrinks too."""
    rng = np.random.default_rng(seed)
    starts = [rng.normal(size=d).astype(np.float32) for _ in range(n)]
    scale = [1.0, 0.5, 0.01, 0.002]
    assert n <= len(scale)
    scale = scale[:n]
    aggs = [
        (s + sc * rng.normal(size=d)).astype(np.float32)
        for s, sc in zip(starts, scale, strict=True)
    ]
    return starts, aggs


def test_fedadam_first_step_by_hand() -> None:
    # delta = (0.2, -0.5); m = 0.1 delta; v = 0.99 tau^2 + 0.01 delta^2; step 0.1 m/(sqrt v + tau)
    opt = OuterOptimizer("fedadam", lr=0.1)
    out = opt.step(np.array([0.0, 1.0], np.float32), np.array([0.2, 0.5], np.float32))
    np.testing.assert_allclose(out, [0.0951260, 0.9019798], atol=2e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_each_optimizer_follows_the_paper_over_several_rounds(name: str) -> None:
    starts, aggs = rounds_of(1)
    lr = 0.3
    opt = OuterOptimizer(name, lr=lr)
    want = reference(name, starts, aggs, lr)
    for k, (s, a) in enumerate(zip(starts, aggs, strict=True)):
        got = opt.step(s, a)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want[k], rtol=1e-5, atol=1e-6, err_msg=f"round {k}")
    assert opt.step_count == len(starts)


def test_the_four_differ_from_each_other_on_the_same_rounds() -> None:
    """The reference could agree with a wrong update only if the variants collapsed."""
    starts, aggs = rounds_of(2)
    finals = {}
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        opt = OuterOptimizer(name, lr=0.3)
        for s, a in zip(starts, aggs, strict=True):
            out = opt.step(s, a)
        finals[name] = out
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-6, atol=1e-7), (a, b)


def test_fedavg_is_the_identity_and_keeps_no_state() -> None:
    opt = OuterOptimizer("fedavg")
    agg = np.array([0.1, np.float32(1) / 3], np.float32)
    out = opt.step(np.zeros(2, np.float32), agg)
    assert out.tobytes() == agg.tobytes()
    assert opt.state() == {}


def test_fedavgm_without_momentum_at_lr_1_is_fedavg() -> None:
    opt = OuterOptimizer("fedavgm", lr=1.0, beta1=0.0)
    starts, aggs = rounds_of(3)
    for s, a in zip(starts, aggs, strict=True):
        np.testing.assert_allclose(opt.step(s, a), a, rtol=0, atol=1e-6)


def test_a_non_finite_aggregate_passes_through_and_leaves_the_state_alone() -> None:
    opt = OuterOptimizer("fedyogi", lr=0.1)
    starts, aggs = rounds_of(4)
    opt.step(starts[0], aggs[0])
    before = opt.state()
    bad = aggs[1].copy()
    bad[2] = np.nan
    out = opt.step(starts[1], bad)
    assert np.isnan(out[2])
    after = opt.state()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_the_default_learning_rate_is_used_at_zero() -> None:
    assert float(OuterOptimizer("fedadam", lr=0).lr) == pytest.approx(DEFAULT_LR["fedadam"])
    with pytest.raises(ValueError, match="unknown outer optimizer"):
        OuterOptimizer("adam")


# ---- state and checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_round_trips_through_a_checkpoint_file(tmp_path: Path, name: str) -> None:
    starts, aggs = rounds_of(5)
    first = OuterOptimizer(name, lr=0.2)
    for s, a in zip(starts[:2], aggs[:2], strict=True):
        first.step(s, a)
    path = tmp_path / "checkpoint.msgpack"
    save_checkpoint(path, Checkpoint(2, starts[2], outer=first.state(), model="softmax"))
    ckpt = load_checkpoint(path)
    assert ckpt is not None
    second = OuterOptimizer(name, lr=0.2)
    assert second.load_state(ckpt.outer, 5)
    assert second.step_count == 2
    for s, a in zip(starts[2:], aggs[2:], strict=True):
        np.testing.assert_array_equal(second.step(s, a), first.step(s, a))


def test_an_old_checkpoint_without_outer_state_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.msgpack"
    save_checkpoint(path, Checkpoint(3, np.ones(4, np.float32), model="softmax"))
    doc = msgpack.unpackb(path.read_bytes(), raw=False)
    del doc["outer"]  # what a checkpoint written before this field looks like
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))
    ckpt = load_checkpoint(path)
    assert ckpt is not None and ckpt.round == 3 and ckpt.outer == {}
    assert not OuterOptimizer("fedadam").load_state(ckpt.outer, 4)


def test_another_optimizers_state_is_not_misread() -> None:
    starts, aggs = rounds_of(6)
    adam = OuterOptimizer("fedadam")
    adam.step(starts[0], aggs[0])
    yogi = OuterOptimizer("fedyogi")
    assert not yogi.load_state(adam.state(), 5)
    assert yogi.state() == {}
    damaged = {**adam.state(), "fedadam.v": np.full(5, np.inf, np.float32)}
    with pytest.raises(ValueError, match="NaN or infinite"):
        OuterOptimizer("fedadam").load_state(damaged, 5)


async def test_a_restarted_node_resumes_its_outer_moments(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=3, model="softmax", outer="fedadam")
    await run_until_done(nodes)
    live = nodes[0].learner.outer
    assert live is not None and live.step_count == 3 and live.m is not None
    ckpt = load_checkpoint(tmp_path / "n0" / "checkpoint.msgpack")
    assert ckpt is not None and ckpt.round == 3
    np.testing.assert_array_equal(ckpt.outer["fedadam.m"], live.m)

    again = make_nodes(tmp_path, 3, MemoryNetwork(), rounds=5, model="softmax", outer="fedadam")
    resumed = again[0].learner.outer
    assert resumed is not None and resumed.step_count == 3
    assert resumed.m is not None and resumed.v is not None and live.v is not None
    np.testing.assert_array_equal(resumed.m, live.m)
    np.testing.assert_array_equal(resumed.v, live.v)
    await run_until_done(again)
    assert resumed.step_count == 5


# ---- FedProx ----------------------------------------------------------------------------


def _toy(seed: int = 0, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    return x, y


def _model(mu: float | None = None) -> SoftmaxRegression:
    m = SoftmaxRegression(6, 3, seed=1, weight_decay=0.0)
    if mu is not None:
        m.set_proximal(mu)
    return m


def test_prox_mu_zero_leaves_training_bit_identical() -> None:
    x, y = _toy()
    plain, zero = _model(), _model(0.0)
    for m in (plain, zero):
        m.fit(x, y, epochs=3, lr=0.1, batch_size=8, rng=np.random.default_rng(7))
    assert plain.get_params().tobytes() == zero.get_params().tobytes()


def test_the_proximal_gradient_matches_finite_differences() -> None:
    x, y = _toy()
    mu = 1.0
    model = _model(mu)
    w = model.get_params()
    anchor = (w + np.random.default_rng(3).normal(0, 0.5, w.size)).astype(np.float32)
    _, grad = model.loss_and_gradient(x, y, anchor=anchor)
    _, plain_grad = model.loss_and_gradient(x, y)
    np.testing.assert_allclose(grad - plain_grad, mu * (w - anchor), rtol=1e-5, atol=1e-6)
    direction = np.random.default_rng(4).normal(size=w.size).astype(np.float32)
    direction /= np.linalg.norm(direction)
    eps = 1e-2

    def objective(params: np.ndarray) -> float:
        model.set_params(params.astype(np.float32))
        return model.loss_and_gradient(x, y, anchor=anchor)[0]

    numeric = (objective(w + eps * direction) - objective(w - eps * direction)) / (2 * eps)
    analytic = float(grad @ direction)
    assert abs(numeric - analytic) < 1e-3 * max(1.0, abs(analytic)), (numeric, analytic)
    # Without the term the directional derivative would be off by this much:
    assert abs(float((mu * (w - anchor)) @ direction)) > 1e-2


def test_fit_steps_along_the_proximal_gradient_and_stays_nearer_the_start() -> None:
    x, y = _toy()
    mu, lr = 0.5, 0.2
    prox = _model(mu)
    start = prox.get_params()
    prox.fit(x, y, epochs=5, lr=lr, batch_size=x.shape[0], rng=np.random.default_rng(0))
    # The same full-batch momentum SGD by hand, the gradient from loss_and_gradient.
    by_hand = _model(mu)
    w = start.copy()
    velocity = np.zeros_like(w)
    for _ in range(5):
        by_hand.set_params(w)
        _, g = by_hand.loss_and_gradient(x, y, anchor=start)
        velocity = 0.9 * velocity + g
        w = (w - lr * velocity).astype(np.float32)
    np.testing.assert_allclose(prox.get_params(), w, rtol=1e-5, atol=1e-6)
    plain = _model()
    plain.fit(x, y, epochs=5, lr=lr, batch_size=x.shape[0], rng=np.random.default_rng(0))
    assert np.linalg.norm(prox.get_params() - start) < np.linalg.norm(plain.get_params() - start)


def test_the_torch_adapter_pulls_towards_the_start_too() -> None:
    torch = pytest.importorskip("torch")
    from p2pfl.adapters.torch import TorchModel

    x, y = _toy()

    def trained(mu: float | None) -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(0)
        model = TorchModel(torch.nn.Linear(6, 3))
        if mu is not None:
            model.set_proximal(mu)
        start = model.get_params()
        model.fit(x, y, epochs=5, lr=0.2, batch_size=64, rng=np.random.default_rng(0))
        return start, model.get_params()

    start, plain = trained(None)
    _, prox = trained(2.0)
    assert np.linalg.norm(prox - start) < 0.9 * np.linalg.norm(plain - start)
    _, zero = trained(0.0)  # mu = 0: exactly the plain training
    assert plain.tobytes() == zero.tobytes()


# ---- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("outer", "adam", "unknown outer optimizer 'adam'"),
        ("outer_lr", -0.1, "must be > 0"),
        ("outer_lr", float("nan"), "must be > 0"),
        ("outer_beta1", 1.0, r"must be in \[0, 1\)"),
        ("outer_beta2", -0.1, r"must be in \[0, 1\)"),
        ("outer_tau", 0.0, "must be a finite number > 0"),
        ("prox_mu", -1.0, "must be a finite number >= 0"),
        ("prox_mu", float("inf"), "must be a finite number >= 0"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        NodeConfig(data_dir=tmp_path, **{field: value}).validated()  # type: ignore[arg-type]
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_the_command_line_sets_them(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["node", "--outer", "fedyogi", "--outer-lr", "0.05", "--prox-mu", "0.01"]
    )
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = build_config({}, coerce(flags, source="command line"))
    assert (config.outer, config.outer_lr, config.prox_mu) == ("fedyogi", 0.05, 0.01)


def test_a_scenario_sets_them_on_every_node_and_names_a_bad_value(tmp_path: Path) -> None:
    sc = parse_scenario({"nodes": 2, "training": {"outer": "fedadam", "prox_mu": 0.1}})
    values = sc.node_config_values(["mem:a", "mem:b"], [tmp_path / "a", tmp_path / "b"])
    assert [(v["outer"], v["prox_mu"]) for v in values] == [("fedadam", 0.1)] * 2
    assert parse_scenario({"nodes": 2}).training.outer == "fedavg"
    for key, value in (("outer", "sgd"), ("outer_beta2", 1.5), ("prox_mu", -0.5)):
        with pytest.raises(ScenarioError) as info:
            parse_scenario({"nodes": 2, "training": {key: value}})
        assert info.value.path == f"training.{key}"


class _NoProx:
    """A Model without FedProx's hook (a user's own model)."""

    def __init__(self) -> None:
        self._inner = SoftmaxRegression(5, 3, seed=0)
        self.num_params = self._inner.num_params

    def get_params(self) -> np.ndarray:
        return self._inner.get_params()

    def set_params(self, params: np.ndarray) -> None:
        self._inner.set_params(params)

    def fit(self, x: np.ndarray, y: np.ndarray, **kw: object) -> float:
        return self._inner.fit(x, y, **kw)  # type: ignore[arg-type]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Mapping[str, float]:
        return self._inner.evaluate(x, y)

    def get_optimizer_state(self) -> dict[str, np.ndarray]:
        return self._inner.get_optimizer_state()

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self._inner.set_optimizer_state(state)

    def reset_optimizer(self) -> None:
        self._inner.reset_optimizer()


def test_prox_mu_with_a_model_that_cannot_honour_it_is_a_config_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int64)
    with pytest.raises(ConfigError, match="set_proximal") as info:
        Learner(
            NodeConfig(data_dir=tmp_path, prox_mu=0.1),
            model=_NoProx(),  # type: ignore[arg-type]
            data=Dataset("toy", x, y, x[:8], y[:8], 3),
            supervisor=Supervisor(logging.getLogger("test"), time.monotonic),
            counters=Counter(),
            threaded=False,
        )
    assert info.value.field == "prox_mu"


def test_fedavg_leaves_the_rule_untouched(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int64)
    config = NodeConfig(data_dir=tmp_path, model="softmax")
    learner = Learner(
        config,
        model=None,
        data=Dataset("toy", x, y, x[:8], y[:8], 3),
        supervisor=Supervisor(logging.getLogger("test"), time.monotonic),
        counters=Counter(),
        threaded=False,
    )
    assert learner.outer_rule(mean) is mean
    adam = Learner(
        dataclasses.replace(config, outer="fedadam"),
        model=None,
        data=Dataset("toy", x, y, x[:8], y[:8], 3),
        supervisor=Supervisor(logging.getLogger("test"), time.monotonic),
        counters=Counter(),
        threaded=False,
    )
    start = adam.model.get_params()
    adam.round_started(0, start)
    inputs = np.stack([start + 0.1, start - 0.3])
    out = adam.outer_rule(mean)(inputs, np.ones(2), inputs[0])
    want = reference("fedadam", [start], [mean(inputs, np.ones(2), inputs[0])], 0.1)[0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


# ---- whole federations ------------------------------------------------------------------


@pytest.mark.parametrize(
    "training",
    [
        {"outer": "fedadam"},
        {"outer": "fedavgm", "outer_beta1": 0.5},
        {"prox_mu": 0.1},
    ],
    ids=["fedadam", "fedavgm", "fedprox"],
)
def test_an_in_process_federation_learns_with_it(tmp_path: Path, training: dict) -> None:
    doc = {
        "name": "optimizers",
        "nodes": 4,
        "rounds": 8,
        "seed": 0,
        "topology": {"kind": "ring"},
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "softmax"},
        "training": {"epochs": 1, "lr": 0.05, **training},
    }
    scenario = parse_scenario(doc)
    records, wall = run_in_process(scenario, tmp_path)
    final = build_metrics(scenario, records, wall_seconds=wall, mode="in-process")["summary"][
        "final"
    ]
    assert final["accuracy_mean"] >= 0.85, final
    assert final["accuracy_min"] >= 0.8, final
