"""DP-SGD in the PyTorch adapter through Opacus: each example's gradient is clipped
before the step (checked against a per-example loop), the noise has the promised std,
and a node's config turns it on or refuses clearly."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from p2pfl.adapters.torch import TorchModel  # noqa: E402


def make(seed: int = 0) -> TorchModel:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return TorchModel(module, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def batch(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


def per_example_clipped_mean(model: TorchModel, x: np.ndarray, y: np.ndarray, clip: float):  # type: ignore[no-untyped-def]
    params = [p for p in model.module.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.module.zero_grad()
        out = model.module(torch.from_numpy(x[i : i + 1]))
        torch.nn.functional.cross_entropy(out, torch.from_numpy(y[i : i + 1])).backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, clip / float(norm))
        total = [t + g * scale for t, g in zip(total, grads, strict=True)]
    return torch.cat([t.flatten() for t in total]).numpy() / len(x)


def test_one_step_moves_by_the_mean_of_clipped_per_example_gradients() -> None:
    x, y = batch()
    clip, lr = 0.05, 0.1
    model = make()
    before = model.get_params()
    expected = per_example_clipped_mean(make(), x, y, clip)
    model.set_dp_sgd(clip, 0.0, seed=0)  # no noise: the clipping alone
    model.fit(x, y, epochs=1, lr=lr, batch_size=len(x), rng=np.random.default_rng(0))
    step = (before - model.get_params()) / lr
    np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-6)
    plain = make()
    plain.fit(x, y, epochs=1, lr=lr, batch_size=len(x), rng=np.random.default_rng(0))
    assert not np.allclose(plain.get_params(), model.get_params())  # clipping mattered


def test_the_noise_has_std_noise_times_clip_over_batch() -> None:
    x, y = batch(8)
    sigma, clip, lr = 2.0, 0.5, 1.0
    steps = []
    for seed in (1, 2):
        model = make()
        model.set_dp_sgd(clip, sigma, seed=seed)
        before = model.get_params()
        model.fit(x, y, epochs=1, lr=lr, batch_size=8, rng=np.random.default_rng(0))
        steps.append(before - model.get_params())
    # Same data, other noise: the difference is the difference of two noises / batch.
    diff = (steps[0] - steps[1]).astype(np.float64)
    assert diff.std() == pytest.approx(np.sqrt(2) * sigma * clip / 8, rel=0.35)  # 48 params


def test_off_and_refusals() -> None:
    x, y = batch()
    a, b = make(), make()
    b.set_dp_sgd(0.0, 1.0, seed=0)
    for m in (a, b):
        m.fit(x, y, epochs=1, lr=0.1, batch_size=4, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a.get_params(), b.get_params())
    with pytest.raises(ValueError, match="DP-SGD"):
        a.set_dp_sgd(-1.0, 1.0, seed=0)
    a.set_dp_sgd(1.0, 1.0, seed=0)
    a.set_proximal(0.1)
    with pytest.raises(ValueError, match="FedProx"):
        a.fit(x, y, epochs=1, lr=0.1, batch_size=4, rng=np.random.default_rng(0))


def test_without_opacus_dp_sgd_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus raises ImportError
    with pytest.raises(NotImplementedError, match=r"p2pfl\[dp\]"):
        make().set_dp_sgd(1.0, 1.0, seed=0)


def test_a_node_config_turns_it_on_through_example_level_dp() -> None:
    pytest.importorskip("dp_accounting")
    from p2pfl.config import NodeConfig
    from p2pfl.privacy.examples import ExampleLevelDP

    model = make()
    config = NodeConfig(dp_sgd_clip=1.0, dp_sgd_noise=1.1).validated()
    dp = ExampleLevelDP.attach(model, config, examples=100)
    assert dp is not None and model._dp is not None
    x, y = batch(16)
    model.fit(x, y, epochs=1, lr=0.1, batch_size=8, rng=np.random.default_rng(0))
    dp.rounds += 1
    assert dp.status()["epsilon"] > 0
