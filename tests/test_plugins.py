"""Models and data by built-in name, data file or import string."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from p2pfl.config import NodeConfig
from p2pfl.learning.datasets import Dataset
from p2pfl.learning.plugins import (
    PluginError,
    is_import_spec,
    load_callable,
    resolve_data,
    resolve_model,
)


def _config(tmp: Path, **fields: object) -> NodeConfig:
    merged: dict[str, object] = {"nodes": 4, "node_index": 1, **fields}
    return NodeConfig(data_dir=tmp / "d", **merged)  # type: ignore[arg-type]


PLUGIN = """
import numpy as np
from p2pfl.learning.datasets import Dataset
from p2pfl.learning.model import build_model

def data(config):
    rng = np.random.default_rng(config.node_index)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return Dataset("mine", x, y, x[:8], y[:8], n_classes=2)

def model(config):
    return build_model("softmax", 3, 2, seed=config.model_seed)

def not_a_model(config):
    return object()

def takes_nothing():
    return None

def raises(config):
    raise RuntimeError("user bug\\nsecond line")
"""


def test_builtin_data_is_this_nodes_shard(tmp_path: Path) -> None:
    ds = resolve_data("digits", _config(tmp_path))
    other = resolve_data("digits", _config(tmp_path, node_index=2))
    assert 300 < len(ds.y_train) < 400  # a quarter of the ~1437 training digits
    assert not np.array_equal(ds.x_train[:5], other.x_train[:5])
    model = resolve_model("mlp", _config(tmp_path, hidden=16), ds)
    assert model.num_params == 64 * 16 + 16 + 16 * 10 + 10


def test_file_py_callable_for_model_and_data(tmp_path: Path) -> None:
    plugin = tmp_path / "my_model.py"
    plugin.write_text(PLUGIN)
    cfg = _config(tmp_path)
    ds = resolve_data(f"{plugin}:data", cfg)
    model = resolve_model(f"{plugin}:model", cfg, ds)
    assert ds.name == "mine" and model.num_params == 3 * 2 + 2
    # Imported once per process, not on every call.
    assert load_callable(f"{plugin}:data") is load_callable(f"{plugin}:data")


def test_module_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_plugins_pkg").mkdir()
    (tmp_path / "my_plugins_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_plugins_pkg" / "models.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _config(tmp_path)
    ds = resolve_data("my_plugins_pkg.models:data", cfg)
    assert resolve_model("my_plugins_pkg.models:model", cfg, ds).num_params == 8
    # A class that wants other arguments is refused with the reason, not called.
    with pytest.raises(PluginError, match="must accept one argument"):
        resolve_model("p2pfl.learning.softmax:SoftmaxRegression", cfg, ds)


def test_npz_file_per_node_index(tmp_path: Path) -> None:
    for i in range(2):
        rng = np.random.default_rng(i)
        np.savez(tmp_path / f"node-{i}.npz", x=rng.normal(size=(30, 2)), y=np.arange(30) % 2)
    ds = resolve_data(str(tmp_path / "node-{index}.npz"), _config(tmp_path, node_index=1))
    assert ds.name.endswith("node-1.npz") and ds.n_features == 2


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("nosuch", "unknown model 'nosuch'"),
        ("{plugin}:not_a_model", "which lacks get_params"),
        ("{plugin}:takes_nothing", "must accept one argument"),
        ("{plugin}:raises", "failed: RuntimeError: user bug"),
        ("{plugin}:missing", "has no callable 'missing'"),
        ("{tmp}/nope.py:model", "no such file"),
        ("no_such_pkg.mod:model", "cannot import 'no_such_pkg.mod'"),
    ],
)
def test_bad_model_specs_say_what_is_wrong_in_one_line(
    tmp_path: Path, spec: str, problem: str
) -> None:
    plugin = tmp_path / "p.py"
    plugin.write_text(PLUGIN)
    spec = spec.format(plugin=plugin, tmp=tmp_path)
    ds = resolve_data("synthetic", _config(tmp_path))
    with pytest.raises(PluginError) as info:
        resolve_model(spec, _config(tmp_path), ds)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_bad_data_specs(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="unknown data set 'mnist'"):
        resolve_data("mnist", _config(tmp_path))
    with pytest.raises(PluginError, match="no such file"):
        resolve_data(str(tmp_path / "x.npz"), _config(tmp_path))
    plugin = tmp_path / "p.py"
    plugin.write_text(PLUGIN)
    with pytest.raises(PluginError, match="not a p2pfl Dataset"):
        resolve_data(f"{plugin}:not_a_model", _config(tmp_path))


@dataclass
class _Spec:
    text: str
    is_import: bool


@pytest.mark.parametrize(
    "case",
    [
        _Spec("pkg.mod:build", True),
        _Spec("models/cnn.py:build", True),
        _Spec("digits", False),
        _Spec("pkg.mod:", False),
        _Spec("pkg.mod:not-an-identifier", False),
    ],
)
def test_is_import_spec(case: _Spec) -> None:
    assert is_import_spec(case.text) is case.is_import


def test_dataset_type_is_the_public_one() -> None:
    assert Dataset.__module__ == "p2pfl.learning.datasets"
