"""The PyTorch adapter (p2pfl.adapters.torch.TorchModel) against a real CPU build of torch.

Skipped, with the reason shown, where torch is not installed (`pip install 'p2pfl[torch]'`).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install 'p2pfl[torch]'")

from p2pfl.adapters.torch import TorchModel  # noqa: E402
from p2pfl.learning import Model, load_dataset  # noqa: E402
from p2pfl.storage import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402

# The CI machine has 2 cores shared with other test processes; one intra-op thread keeps
# these small models fast and avoids oversubscription.
torch.set_num_threads(1)

N_SMALL = 256


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def small_xy(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    return ds.x_train[:N_SMALL], ds.y_train[:N_SMALL]


def mlp(seed: int = 0, *, bn: bool = True, dropout: float = 0.0) -> Any:
    """A small MLP on the 64 digit pixels, identically initialized for a given seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [torch.nn.Linear(64, 16)]
        if bn:
            layers.append(torch.nn.BatchNorm1d(16))
        layers += [torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 10)]
        return torch.nn.Sequential(*layers)


def cnn(seed: int = 0) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(16 * 8 * 8, 10),
        )


def fit(model: TorchModel, x: np.ndarray, y: np.ndarray, seed: int, **kw: Any) -> float:
    args: dict[str, Any] = {"epochs": 1, "lr": 0.05, "batch_size": 32} | kw
    return model.fit(x, y, rng=np.random.default_rng(seed), **args)


def module_vector(module: Any) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy()


# --- packaging --------------------------------------------------------------------------------
def test_importing_p2pfl_does_not_import_torch() -> None:
    code = (
        "import sys, p2pfl, p2pfl.adapters, p2pfl.learning, p2pfl.learning.plugins\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
        "import p2pfl.adapters.torch\n"
        "assert 'torch' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_is_a_model() -> None:
    assert isinstance(TorchModel(mlp()), Model)


# --- parameters ---------------------------------------------------------------------------------
def test_get_set_round_trip_and_get_returns_a_copy(digits: Any) -> None:
    model = TorchModel(mlp(), buffers="local")
    params = model.get_params()
    assert params.dtype == np.float32
    assert params.shape == (model.num_params,)
    assert model.num_params == sum(p.numel() for p in model.module.parameters())
    np.testing.assert_array_equal(params, module_vector(model.module))
    params += 1.0  # a copy: the model must not change
    assert not np.array_equal(model.get_params(), params)
    model.set_params(params)
    np.testing.assert_array_equal(model.get_params(), params)
    np.testing.assert_array_equal(module_vector(model.module), params)


def test_parameters_are_views_of_one_flat_buffer(digits: Any) -> None:
    model = TorchModel(mlp(), buffers="local")
    x, y = small_xy(digits)
    storages = {p.untyped_storage().data_ptr() for p in model.module.parameters()}
    assert len(storages) == 1

    xb = torch.from_numpy(np.array(x[:8]))
    model.module.eval()
    before = model.module(xb).detach().clone()
    model.set_params(model.get_params() * np.float32(0.5))
    after = model.module(xb).detach()
    assert not torch.equal(before, after)  # set_params reached the module in place

    start = model.get_params()
    fit(model, x, y, seed=1)
    trained = model.get_params()
    assert not np.array_equal(start, trained)  # the optimizer's steps landed in the vector
    np.testing.assert_array_equal(trained, module_vector(model.module))
    assert {p.untyped_storage().data_ptr() for p in model.module.parameters()} == storages


def test_re_pointed_parameter_is_detected() -> None:
    model = TorchModel(mlp(), buffers="local")
    first = model.module[0]
    first.weight.data = first.weight.data.clone()  # no longer a view of the flat vector
    with pytest.raises(RuntimeError, match="no longer lives in the flat"):
        model.get_params()


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda n: np.zeros(n, dtype=np.float64), "dtype float32"),
        (lambda n: np.zeros(n + 1, dtype=np.float32), "shape"),
        (lambda n: np.zeros((1, n), dtype=np.float32), "shape"),
        (lambda n: np.full(n, np.nan, dtype=np.float32), "NaN or infinite"),
        (lambda n: np.full(n, np.inf, dtype=np.float32), "NaN or infinite"),
        (lambda n: [0.0] * n, "numpy array"),
    ],
)
def test_set_params_rejects_bad_vectors(bad: Any, match: str) -> None:
    model = TorchModel(mlp())
    before = model.get_params()
    with pytest.raises(ValueError, match=match):
        model.set_params(bad(model.num_params))
    np.testing.assert_array_equal(model.get_params(), before)


def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError, match="float32"):
        TorchModel(mlp().double())
    with pytest.raises(ValueError, match="buffers"):
        TorchModel(mlp(), buffers="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task"):
        TorchModel(mlp(), task="ranking")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a module parameter"):
        TorchModel(mlp(), optimizer=lambda _: torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]))
    with pytest.raises(ValueError, match="data must be"):
        TorchModel(mlp(), data="train.npz")


def test_device_option() -> None:
    assert TorchModel(mlp(), device="auto").device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            TorchModel(mlp(), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_round_trip_and_fit(digits: Any) -> None:
    model = TorchModel(mlp(), device="cuda")
    x, y = small_xy(digits)
    params = model.get_params() + np.float32(0.01)
    model.set_params(params)
    np.testing.assert_array_equal(model.get_params(), params)
    fit(model, x, y, seed=0)
    assert np.isfinite(model.get_params()).all()
    assert set(model.evaluate(x, y)) == {"loss", "accuracy"}


# --- training -----------------------------------------------------------------------------------
def test_same_rng_same_result_and_global_rng_untouched(digits: Any) -> None:
    x, y = small_xy(digits)
    results = []
    for seed in (3, 3, 4):
        model = TorchModel(mlp(dropout=0.3))
        global_state = torch.get_rng_state()
        loss = fit(model, x, y, seed=seed, epochs=2)
        assert torch.equal(torch.get_rng_state(), global_state)
        results.append((loss, model.get_params()))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert not np.array_equal(results[0][1], results[2][1])


def test_node_lr_is_honoured_unless_fixed(digits: Any) -> None:
    x, y = small_xy(digits)
    model = TorchModel(mlp())
    fit(model, x, y, seed=0, lr=0.123)
    assert [g["lr"] for g in model.optimizer.param_groups] == [0.123]
    fixed = TorchModel(mlp(), optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3), node_lr=False)
    fit(fixed, x, y, seed=0, lr=0.123)
    assert [g["lr"] for g in fixed.optimizer.param_groups] == [1e-3]

    slow, fast = TorchModel(mlp()), TorchModel(mlp())
    start = slow.get_params()
    fit(slow, x, y, seed=0, lr=1e-4)
    fit(fast, x, y, seed=0, lr=1e-1)
    assert np.abs(slow.get_params() - start).sum() < np.abs(fast.get_params() - start).sum()


def test_fit_argument_errors(digits: Any) -> None:
    model = TorchModel(mlp())
    x, y = small_xy(digits)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, x, y, seed=0, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        fit(model, x, y, seed=0, lr=0.0)
    with pytest.raises(ValueError, match="same length"):
        fit(model, x, y[:-1], seed=0)
    with pytest.raises(ValueError, match="empty"):
        fit(model, x[:0], y[:0], seed=0)
    with pytest.raises(ValueError, match="input_shape"):
        fit(TorchModel(cnn(), input_shape=(1, 7, 7)), x, y, seed=0)


def test_read_only_shards_train_without_warnings(digits: Any) -> None:
    x, y = small_xy(digits)
    assert not x.flags.writeable  # the node's shards are read-only views
    model = TorchModel(mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, x, y, seed=0)
        model.evaluate(x, y)


def test_optimizer_state_round_trip_through_a_checkpoint_resumes_exactly(
    digits: Any, tmp_path: Path
) -> None:
    x, y = small_xy(digits)
    for factory in (None, lambda ps: torch.optim.Adam(ps, lr=1e-3)):
        node_lr = factory is None
        a = TorchModel(mlp(), optimizer=factory, node_lr=node_lr)
        fit(a, x, y, seed=1)
        path = tmp_path / "ckpt"
        save_checkpoint(
            path, Checkpoint(round=1, params=a.get_params(), optimizer=a.get_optimizer_state())
        )
        fit(a, x, y, seed=2)
        expected = a.get_params()

        ckpt = load_checkpoint(path)
        assert ckpt is not None
        b = TorchModel(mlp(seed=9), optimizer=factory, node_lr=node_lr)
        b.set_params(ckpt.params)
        b.set_optimizer_state(ckpt.optimizer)
        fit(b, x, y, seed=2)
        np.testing.assert_array_equal(b.get_params(), expected)

        # Without the optimizer state the same step lands elsewhere: the state matters.
        c = TorchModel(mlp(seed=9), optimizer=factory, node_lr=node_lr)
        c.set_params(ckpt.params)
        fit(c, x, y, seed=2)
        assert not np.array_equal(c.get_params(), expected)


def test_optimizer_state_names_and_dtypes(digits: Any) -> None:
    model = TorchModel(mlp(), optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3), node_lr=False)
    assert model.get_optimizer_state() == {"buffer/1.num_batches_tracked": np.array(0, np.int32)}
    fit(model, *small_xy(digits), seed=0)
    state = model.get_optimizer_state()
    assert state["0.weight/exp_avg"].shape == (16, 64)
    assert state["0.weight/step"].shape == ()
    assert state["buffer/1.num_batches_tracked"] == 8  # 256 samples / 32 per batch
    assert {v.dtype for v in state.values()} <= {np.dtype(np.float32), np.dtype(np.int32)}


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("nonexistent.weight/momentum_buffer", np.zeros(3, np.float32), "names no parameter"),
        ("0.weight/momentum_buffer", np.zeros((64, 16), np.float32), "shape"),
        ("0.weight/momentum_buffer", np.full((16, 64), np.nan, np.float32), "NaN"),
        ("0.weight/momentum_buffer", [[0.0]], "numeric numpy array"),
        ("buffer/9.running_mean", np.zeros(16, np.float32), "no local buffer"),
        ("buffer/1.num_batches_tracked", np.zeros(2, np.int32), "shape"),
    ],
)
def test_set_optimizer_state_rejects_what_does_not_fit(
    digits: Any, key: str, value: Any, match: str
) -> None:
    model = TorchModel(mlp())
    fit(model, *small_xy(digits), seed=0)
    before = model.get_optimizer_state()
    with pytest.raises(ValueError, match=match):
        model.set_optimizer_state({key: value})
    after = model.get_optimizer_state()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_reset_optimizer_drops_the_momentum(digits: Any) -> None:
    model = TorchModel(mlp())
    fit(model, *small_xy(digits), seed=0)
    assert any(k.endswith("/momentum_buffer") for k in model.get_optimizer_state())
    model.reset_optimizer()
    assert not any(k.endswith("/momentum_buffer") for k in model.get_optimizer_state())


# --- buffers ------------------------------------------------------------------------------------
def test_shared_buffers_travel_in_the_vector(digits: Any) -> None:
    x, y = small_xy(digits)
    model = TorchModel(mlp())  # buffers="shared" is the default
    names = [name for name, _ in model.layout()]
    assert names[-2:] == ["1.running_mean", "1.running_var"]
    n_weights = sum(p.numel() for p in model.module.parameters())
    assert model.num_params == n_weights + 2 * 16
    bn = model.module[1]

    fit(model, x, y, seed=0)
    params = model.get_params()
    np.testing.assert_array_equal(params[n_weights : n_weights + 16], bn.running_mean.numpy())
    assert not np.allclose(params[n_weights : n_weights + 16], 0.0)  # trained statistics

    # A second instance that only receives the vector (as the node's evaluation model
    # does) evaluates exactly like the trained one.
    twin = TorchModel(mlp(seed=5))
    twin.set_params(params)
    np.testing.assert_array_equal(twin.module[1].running_var.numpy(), bn.running_var.numpy())
    assert twin.evaluate(x, y) == model.evaluate(x, y)


def test_negative_shared_running_variance_is_clamped(digits: Any) -> None:
    x, y = small_xy(digits)
    model = TorchModel(mlp())
    fit(model, x, y, seed=0)
    params = model.get_params()
    var = slice(model.num_params - 16, model.num_params)  # running_var is the last slot
    params[var] = -1.0  # e.g. from a Byzantine peer
    model.set_params(params)
    np.testing.assert_array_equal(model.module[1].running_var.numpy(), np.zeros(16, np.float32))
    np.testing.assert_array_equal(model.get_params()[var], np.zeros(16, np.float32))
    assert np.isfinite(model.evaluate(x, y)["loss"])


def test_local_buffers_stay_out_of_the_vector_but_in_the_checkpoint(digits: Any) -> None:
    x, y = small_xy(digits)
    model = TorchModel(mlp(), buffers="local")
    assert model.num_params == sum(p.numel() for p in model.module.parameters())
    assert all("running" not in name for name, _ in model.layout())
    fit(model, x, y, seed=0)
    params = model.get_params()
    state = model.get_optimizer_state()
    np.testing.assert_array_equal(state["buffer/1.running_mean"], model.module[1].running_mean)

    twin = TorchModel(mlp(seed=5), buffers="local")
    twin.set_params(params)
    # The statistics did not travel: the twin still has its initial ones.
    np.testing.assert_array_equal(twin.module[1].running_mean.numpy(), np.zeros(16, np.float32))
    assert twin.evaluate(x, y) != model.evaluate(x, y)
    twin.set_optimizer_state(state)  # ... and a checkpoint restores them
    assert twin.evaluate(x, y) == model.evaluate(x, y)
    assert int(twin.module[1].num_batches_tracked) == int(model.module[1].num_batches_tracked)


# --- data ---------------------------------------------------------------------------------------
def test_own_data_replaces_the_node_arrays(digits: Any) -> None:
    x, y = small_xy(digits)
    tensors = (torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)))
    empty_x, empty_y = x[:0], y[:0]
    for data in (tensors, torch.utils.data.TensorDataset(*tensors)):
        a, b = TorchModel(mlp(), data=data), TorchModel(mlp())
        assert a.num_samples == N_SMALL
        fit(a, empty_x, empty_y, seed=0)  # ignored: trains on `data`
        fit(b, x, y, seed=0)
        np.testing.assert_array_equal(a.get_params(), b.get_params())

    results = []
    for _ in range(2):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*tensors), batch_size=32, shuffle=True
        )
        model = TorchModel(mlp(), data=loader, test_data=loader)
        assert model.num_samples == N_SMALL
        fit(model, empty_x, empty_y, seed=7)
        results.append(model.get_params())
        assert set(model.evaluate(empty_x, empty_y)) == {"loss", "accuracy"}
    np.testing.assert_array_equal(results[0], results[1])  # the loader's shuffle is seeded


def test_regression_task_reports_loss_only() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TorchModel(torch.nn.Linear(3, 1), task="regression")
    first = model.evaluate(x, y)
    assert set(first) == {"loss"}
    fit(model, x, y, seed=0, epochs=20, lr=0.05, batch_size=20)
    assert model.evaluate(x, y)["loss"] < 0.01 * first["loss"]


def test_small_cnn_learns_the_digits(digits: Any) -> None:
    model = TorchModel(cnn(), input_shape=(1, 8, 8))
    losses = [fit(model, digits.x_train, digits.y_train, seed=epoch, lr=0.05) for epoch in range(3)]
    assert losses[-1] < losses[0]
    metrics = model.evaluate(digits.x_test, digits.y_test)
    assert metrics["accuracy"] > 0.9, metrics


# --- the example ----------------------------------------------------------------------------------
def test_example_builds_through_the_plugin_resolver() -> None:
    from p2pfl.config import NodeConfig
    from p2pfl.learning.plugins import resolve_data, resolve_model

    root = Path(__file__).resolve().parents[1]
    spec = f"{root / 'examples' / 'torch_cnn' / 'model.py'}:build"
    config = NodeConfig(node_index=1, nodes=4)
    data = resolve_data("digits", config)
    trains, evaluates = (resolve_model(spec, config, data) for _ in range(2))
    assert isinstance(trains, TorchModel)
    # Every build on every node starts from the same weights (seeded by model_seed).
    np.testing.assert_array_equal(trains.get_params(), evaluates.get_params())
    other = resolve_model(spec, NodeConfig(node_index=1, nodes=4, model_seed=1), data)
    assert not np.array_equal(trains.get_params(), other.get_params())

    fit(trains, data.x_train, data.y_train, seed=0)
    evaluates.set_params(trains.get_params())
    assert evaluates.evaluate(data.x_test, data.y_test) == trains.evaluate(data.x_test, data.y_test)
