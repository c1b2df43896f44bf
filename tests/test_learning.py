"""Models (gradients, training, state round-trips) and datasets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.learning import Model, build_model, load_dataset
from p2pfl.learning import datasets as datasets_mod
from p2pfl.learning.model import FlatParamModel


# --- float64 reference math (independent of the models' float32 code) --------------------
def _xent64(z: np.ndarray, y: np.ndarray) -> float:
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float((lse - z[np.arange(len(y)), y]).mean())


def _softmax_objective(p: np.ndarray, x: np.ndarray, y: np.ndarray, k: int, wd: float) -> float:
    d = x.shape[1]
    w, b = p[: d * k].reshape(d, k), p[d * k :]
    return _xent64(x @ w + b, y) + 0.5 * wd * float((w**2).sum())


def _mlp_objective(p: np.ndarray, x: np.ndarray, y: np.ndarray, k: int, h: int, wd: float) -> float:
    d = x.shape[1]
    o1, o2, o3 = d * h, d * h + h, d * h + h + h * k
    w1, b1, w2, b2 = p[:o1].reshape(d, h), p[o1:o2], p[o2:o3].reshape(h, k), p[o3:]
    a = np.maximum(x @ w1 + b1, 0.0)
    return _xent64(a @ w2 + b2, y) + 0.5 * wd * float((w1**2).sum() + (w2**2).sum())


def _numeric_grad(f: Any, p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.empty_like(p)
    for i in range(p.size):  # test-only reference; a few hundred coordinates
        e = np.zeros_like(p)
        e[i] = eps
        grad[i] = (f(p + e) - f(p - e)) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_gradient_matches_finite_differences(name: str) -> None:
    rng = np.random.default_rng(1)
    d, k, h, n = 6, 4, 5, 30
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, size=n)
    model = build_model(name, d, k, seed=3, hidden=h)
    assert isinstance(model, FlatParamModel)
    # Move away from the tiny init so weight decay and all logits matter.
    model.set_params(rng.normal(0, 0.5, size=model.num_params).astype(np.float32))
    p64 = model.get_params().astype(np.float64)
    x64 = x.astype(np.float64)
    wd = float(model.weight_decay)  # type: ignore[attr-defined]
    if name == "softmax":

        def f(p: np.ndarray) -> float:
            return _softmax_objective(p, x64, y, k, wd)
    else:

        def f(p: np.ndarray) -> float:
            return _mlp_objective(p, x64, y, k, h, wd)

    loss, analytic = model.loss_and_gradient(x, y)
    numeric = _numeric_grad(f, p64)
    rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    assert rel < 1e-4, rel
    assert analytic.dtype == np.float32
    # The reported loss is the cross-entropy without the weight-decay term.
    assert loss == pytest.approx(f(p64) - _penalty(p64, d, k, h, wd, name), rel=1e-5)


def _penalty(p: np.ndarray, d: int, k: int, h: int, wd: float, name: str) -> float:
    if name == "softmax":
        return 0.5 * wd * float((p[: d * k] ** 2).sum())
    o1, o2, o3 = d * h, d * h + h, d * h + h + h * k
    return 0.5 * wd * float((p[:o1] ** 2).sum() + (p[o2:o3] ** 2).sum())


def test_softmax_is_stable_for_huge_logits() -> None:
    model = build_model("softmax", 2, 3, seed=0)
    model.set_params(np.array([1e4, -1e4, 0, 0, 0, 0, 0, 0, 0], dtype=np.float32))
    x = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    m = model.evaluate(x, np.array([0, 1]))
    loss, acc = m["loss"], m["accuracy"]
    assert np.isfinite(loss)
    assert loss == pytest.approx(0.5 * 2e4, rel=1e-4)  # -log p for the wrong class is 2e4
    assert acc == 0.5


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_learns_digits(name: str) -> None:
    ds = load_dataset("digits")
    model = build_model(name, ds.n_features, ds.n_classes, seed=0)
    m0 = model.evaluate(ds.x_test, ds.y_test)
    loss0, acc0 = m0["loss"], m0["accuracy"]
    first = model.fit(
        ds.x_train, ds.y_train, epochs=1, lr=0.05, batch_size=32, rng=np.random.default_rng(0)
    )
    last = model.fit(
        ds.x_train, ds.y_train, epochs=4, lr=0.05, batch_size=32, rng=np.random.default_rng(1)
    )
    acc = model.evaluate(ds.x_test, ds.y_test)["accuracy"]
    assert acc0 < 0.3
    assert last < first < loss0
    assert acc > 0.9


def test_build_model_is_deterministic_per_seed() -> None:
    for name in ("softmax", "mlp"):
        a = build_model(name, 64, 10, seed=7).get_params()
        b = build_model(name, 64, 10, seed=7).get_params()
        c = build_model(name, 64, 10, seed=8).get_params()
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)
    assert build_model("softmax", 64, 10, seed=0).num_params == 64 * 10 + 10
    assert build_model("mlp", 64, 10, seed=0, hidden=16).num_params == 64 * 16 + 16 + 16 * 10 + 10


def test_build_model_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="softmax, mlp"):
        build_model("resnet", 64, 10, seed=0)


def test_models_satisfy_protocol() -> None:
    assert isinstance(build_model("softmax", 4, 3, seed=0), Model)
    assert isinstance(build_model("mlp", 4, 3, seed=0), Model)


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_params_round_trip_and_copy_semantics(name: str) -> None:
    model = build_model(name, 5, 3, seed=0)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    new = np.linspace(-1, 1, model.num_params, dtype=np.float32)
    model.set_params(new)
    new[:] = 0  # the model must have copied, not aliased
    got = model.get_params()
    assert got.dtype == np.float32 and got.shape == (model.num_params,)
    assert np.array_equal(got, np.linspace(-1, 1, model.num_params, dtype=np.float32))
    got[:] = 0  # nor may get_params hand out its internal buffer
    assert not np.array_equal(model.get_params(), got)
    # The layer views follow set_params: predictions change with the parameters.
    before = model.evaluate(x, np.zeros(4, dtype=np.int64))
    model.set_params(np.zeros(model.num_params, dtype=np.float32))
    assert model.evaluate(x, np.zeros(4, dtype=np.int64))["loss"] == pytest.approx(np.log(3))
    assert before["loss"] != pytest.approx(np.log(3))


def test_set_params_validates() -> None:
    model = build_model("softmax", 5, 3, seed=0)
    n = model.num_params
    with pytest.raises(ValueError, match="shape"):
        model.set_params(np.zeros(n + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        model.set_params(np.zeros((1, n), dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        model.set_params(np.zeros(n, dtype=np.float64))
    bad = np.zeros(n, dtype=np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.set_params(bad)
    with pytest.raises(ValueError, match="numpy array"):
        model.set_params([0.0] * n)  # type: ignore[arg-type]


def test_fit_and_evaluate_validate_inputs() -> None:
    model = build_model("softmax", 5, 3, seed=0)
    x = np.zeros((4, 5), dtype=np.float32)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="x must have shape"):
        model.evaluate(np.zeros((4, 6), dtype=np.float32), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="labels"):
        model.evaluate(x, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="y must have shape"):
        model.evaluate(x, np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="epochs"):
        model.fit(x, np.zeros(4, dtype=np.int64), epochs=0, lr=0.1, batch_size=2, rng=rng)
    with pytest.raises(ValueError, match="empty"):
        model.fit(x[:0], np.zeros(0, dtype=np.int64), epochs=1, lr=0.1, batch_size=2, rng=rng)


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_optimizer_state_round_trip_resumes_exactly(name: str) -> None:
    ds = load_dataset("digits")
    x, y = ds.x_train[:300], ds.y_train[:300]
    kw: dict[str, Any] = {"epochs": 2, "lr": 0.05, "batch_size": 32}
    a = build_model(name, ds.n_features, ds.n_classes, seed=0)
    a.fit(x, y, rng=np.random.default_rng(0), **kw)
    params, state = a.get_params(), a.get_optimizer_state()
    assert np.abs(state["momentum"]).sum() > 0
    a.fit(x, y, rng=np.random.default_rng(1), **kw)

    resumed = build_model(name, ds.n_features, ds.n_classes, seed=99)
    resumed.set_params(params)
    resumed.set_optimizer_state(state)
    resumed.fit(x, y, rng=np.random.default_rng(1), **kw)
    assert np.array_equal(resumed.get_params(), a.get_params())

    # Without the momentum buffer the continuation differs: the state really matters.
    cold = build_model(name, ds.n_features, ds.n_classes, seed=0)
    cold.set_params(params)
    cold.fit(x, y, rng=np.random.default_rng(1), **kw)
    assert not np.array_equal(cold.get_params(), a.get_params())
    a.reset_optimizer()
    assert not a.get_optimizer_state()["momentum"].any()


def test_set_optimizer_state_validates() -> None:
    model = build_model("mlp", 5, 3, seed=0)
    good = model.get_optimizer_state()
    with pytest.raises(ValueError, match="momentum"):
        model.set_optimizer_state({"velocity": good["momentum"]})
    with pytest.raises(ValueError, match="shape"):
        model.set_optimizer_state({"momentum": good["momentum"][:-1]})
    state = model.get_optimizer_state()
    state["momentum"][:] = 1  # a copy: mutating it leaves the model alone
    assert not model.get_optimizer_state()["momentum"].any()


# --- datasets -------------------------------------------------------------------------
def test_digits_split_shapes_and_scaling() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.n_classes == 10 and ds.n_features == 64
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert len(ds.y_test) == pytest.approx(0.2 * 1797, abs=10)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_test.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert np.abs(ds.x_train.mean(axis=0)).max() < 1e-4
    varying = ds.x_train.std(axis=0) > 0
    assert np.allclose(ds.x_train.std(axis=0)[varying], 1.0, atol=1e-3)
    # Stratified: every class is in the test set in proportion.
    train_share = np.bincount(ds.y_train, minlength=10) / len(ds.y_train)
    test_share = np.bincount(ds.y_test, minlength=10) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    assert not ds.x_train.flags.writeable  # shared by in-process nodes


def test_split_is_deterministic_per_seed() -> None:
    a = load_dataset("digits", seed=3)
    assert load_dataset("digits", seed=3) is a  # cached per process
    datasets_mod._load_split.cache_clear()
    b = load_dataset("digits", seed=3)
    assert b is not a
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    c = load_dataset("digits", seed=4)
    assert not np.array_equal(a.y_train, c.y_train)


def test_synthetic_is_deterministic_and_not_trivial() -> None:
    ds = load_dataset("synthetic", seed=0)
    assert (ds.n_features, ds.n_classes) == (20, 10)
    assert len(ds.y_train) + len(ds.y_test) == 6000
    datasets_mod._load_split.cache_clear()
    again = load_dataset("synthetic", seed=0)
    assert np.array_equal(ds.x_train, again.x_train)
    assert not np.array_equal(ds.x_train, load_dataset("synthetic", seed=1).x_train)
    model = build_model("softmax", ds.n_features, ds.n_classes, seed=0)
    model.fit(
        ds.x_train, ds.y_train, epochs=5, lr=0.05, batch_size=64, rng=np.random.default_rng(0)
    )
    acc = model.evaluate(ds.x_test, ds.y_test)["accuracy"]
    assert 0.8 < acc < 0.97


def test_unknown_dataset_and_bad_fraction() -> None:
    with pytest.raises(ValueError, match="digits, synthetic"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


def test_digits_from_a_broken_install_name_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The digits ship with p2pfl (no extra to install); only a damaged install lacks them.
    monkeypatch.setattr(datasets_mod, "DIGITS_FILE", tmp_path / "digits.npz")
    datasets_mod._digits_raw.cache_clear()
    datasets_mod._load_split.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"digits.npz cannot be read"):
            load_dataset("digits", seed=12345)
    finally:
        datasets_mod._digits_raw.cache_clear()
        datasets_mod._load_split.cache_clear()


def test_loading_digits_does_not_import_sklearn() -> None:
    code = (
        "import sys; from p2pfl.learning import load_dataset; "
        "load_dataset('digits'); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
