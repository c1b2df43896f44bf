"""Example-level DP-SGD in the built-in numpy models: per-example clipping computed
without per-example gradients matches the brute-force definition, the noise has the
std the mechanism promises, and off means bit-identical training."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from p2pfl.learning.mlp import MLP
from p2pfl.learning.model import FlatParamModel
from p2pfl.learning.softmax import SoftmaxRegression

MODELS: dict[str, Callable[[], FlatParamModel]] = {
    "mlp": lambda: MLP(10, 4, seed=1, hidden=6, weight_decay=0.0),
    "softmax": lambda: SoftmaxRegression(10, 4, seed=1, weight_decay=0.0),
}


def batch(n: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 10)).astype(np.float32), rng.integers(0, 4, n)


def brute_force_clipped_sum(model: FlatParamModel, x: np.ndarray, y: np.ndarray, clip: float):  # type: ignore[no-untyped-def]
    total = np.zeros(model.num_params, dtype=np.float64)
    for i in range(len(x)):
        _, g = model.loss_and_gradient(x[i : i + 1], y[i : i + 1])
        total += g * min(1.0, clip / float(np.linalg.norm(g)))
    return total


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("clip", [0.05, 0.5, 1e6])
def test_clipped_sum_matches_per_example_brute_force(name: str, clip: float) -> None:
    model = MODELS[name]()
    x, y = batch()
    ref = brute_force_clipped_sum(model, x, y, clip)
    model._clipped_backward(x, y.astype(np.int64), clip)
    clipped_sum = model._grad.copy()
    np.testing.assert_allclose(clipped_sum, ref, rtol=1e-4, atol=1e-6)
    if clip == 1e6:  # nothing clipped: the sum of the gradients, n times the mean's
        _, mean_grad = model.loss_and_gradient(x, y)
        np.testing.assert_allclose(clipped_sum, len(x) * mean_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_noise_has_std_noise_times_clip_over_batch(name: str) -> None:
    model = MLP(10, 4, seed=1, hidden=256, weight_decay=0.0) if name == "mlp" else MODELS[name]()
    x, y = batch()
    sigma, clip = 0.7, 0.3
    model.set_dp_sgd(clip, sigma, seed=5)
    model._dp_backward(x, y.astype(np.int64))
    first = model._grad.copy()
    model._dp_backward(x, y.astype(np.int64))
    # Same parameters and batch: the difference is the difference of two noises.
    diff = (model._grad - first).astype(np.float64)
    expected = np.sqrt(2.0) * sigma * clip / len(x)
    tolerance = 0.1 if model.num_params > 1000 else 0.3  # a few std of the estimate
    assert abs(diff.std() / expected - 1.0) < tolerance


@pytest.mark.parametrize("name", MODELS)
def test_off_is_bit_identical_and_bad_values_are_refused(name: str) -> None:
    x, y = batch(40)
    plain, off = MODELS[name](), MODELS[name]()
    off.set_dp_sgd(0.0, 1.0, seed=0)
    for m in (plain, off):
        m.fit(x, y, epochs=2, lr=0.1, batch_size=8, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(plain.get_params(), off.get_params())
    for clip, noise in ((-1.0, 1.0), (float("nan"), 1.0), (1.0, -0.5)):
        with pytest.raises(ValueError, match="DP-SGD"):
            off.set_dp_sgd(clip, noise, seed=0)


def test_dp_sgd_still_learns_digits() -> None:
    pytest.importorskip("sklearn")
    from p2pfl.learning.datasets import load_dataset

    data = load_dataset("digits")
    model = SoftmaxRegression(data.x_train.shape[1], 10, seed=0)
    model.set_dp_sgd(1.0, 0.8, seed=0)
    model.fit(
        data.x_train, data.y_train, epochs=5, lr=0.1, batch_size=64, rng=np.random.default_rng(0)
    )
    assert model.evaluate(data.x_test, data.y_test)["accuracy"] > 0.8


def test_a_model_without_per_example_gradients_refuses() -> None:
    class Opaque(SoftmaxRegression):
        def _clipped_backward(self, x, y, clip):  # type: ignore[no-untyped-def]
            return FlatParamModel._clipped_backward(self, x, y, clip)

    with pytest.raises(NotImplementedError, match="DP-SGD"):
        Opaque(10, 4, seed=0).set_dp_sgd(1.0, 1.0, seed=0)


# ---- wiring: config, accounting, a running node ------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"dp_sgd_clip": 1.0}, "dp_sgd_noise", "protects no example"),
        ({"dp_sgd_noise": 1.0}, "dp_sgd_clip", "scaled by the clip"),
        ({"dp_sgd_clip": -1.0, "dp_sgd_noise": 1.0}, "dp_sgd_clip", ">= 0"),
        ({"dp_sgd_clip": 1.0, "dp_sgd_noise": float("inf")}, "dp_sgd_noise", "finite"),
    ],
)
def test_dp_sgd_config_errors_are_one_line(
    fields: dict[str, float], field: str, words: str
) -> None:
    from p2pfl.config import ConfigError, NodeConfig

    with pytest.raises(ConfigError) as info:
        NodeConfig(**fields).validated()  # type: ignore[arg-type]
    assert info.value.field == field and words in str(info.value)
    assert "\n" not in str(info.value)


def test_example_level_epsilon_composes_over_steps_with_subsampling() -> None:
    dpa = pytest.importorskip("dp_accounting")
    from p2pfl.privacy.accountant import dp_sgd_epsilon

    assert dp_sgd_epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    eps = [dp_sgd_epsilon(0.1, 1.0, steps, 1e-5) for steps in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]
    accountant = dpa.rdp.RdpAccountant()
    accountant.compose(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1.0)), 100)
    )
    assert eps[1] == pytest.approx(accountant.get_epsilon(1e-5))
    # Subsampling amplifies: the same steps on full batches cost much more.
    assert dp_sgd_epsilon(1.0, 1.0, 100, 1e-5) > 5 * eps[1]


async def test_a_node_with_dp_sgd_reports_example_level_epsilon(tmp_path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("dp_accounting")
    import io

    from rich.console import Console
    from test_node_inmemory import make_nodes, run_until_done

    from p2pfl.control.render import render_status
    from p2pfl.transport.memory import MemoryNetwork

    nodes = make_nodes(tmp_path, 2, MemoryNetwork(), rounds=3, dp_sgd_clip=1.0, dp_sgd_noise=1.0)
    await run_until_done(nodes)
    for node in nodes:
        rows = node.all_rows()
        eps = [r["privacy_examples"]["epsilon"] for r in rows]
        assert eps[0] > 0 and eps == sorted(eps) and eps[0] < eps[-1]
        status = node.status()["privacy_examples"]
        assert status["rounds"] == 3 and status["steps"] == 3 * node.learner.dp_sgd.steps_per_round
        out = io.StringIO()
        Console(file=out, width=200, color_system=None).print(render_status(node.status()))
        assert "DP-SGD" in out.getvalue()


def test_the_scenario_privacy_table_takes_dp_sgd() -> None:
    from p2pfl.scenario import parse_scenario

    s = parse_scenario({"nodes": 2, "privacy": {"sgd_clip": 1.0, "sgd_noise": 0.8}})
    assert s.privacy.sgd_clip == 1.0 and s.privacy.sgd_noise == 0.8
