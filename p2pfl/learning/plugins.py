"""Models and data by name: a built-in, `package.module:callable` or `file.py:callable`.

One resolver for every place a model or data set is named (CLI flags, node TOML files,
scenario files, the Python API), so a new model or data set is one registry entry, or
no edit inside the package at all:

* a built-in name (`MODEL_NAMES`, `DATASET_NAMES`) resolves through this module's
  registry, and a built-in data set is cut into this node's shard;
* a path ending in `.npz` / `.csv` is the device's own data file (`{index}` in it is
  replaced by the node's index, so a scenario can give each node its own file);
* `package.module:callable` or `path/to/file.py:callable` is imported and called with
  the node's config; it returns a `Model` or a `Dataset`.

Errors are `PluginError` (a `ValueError`) with a one-line message naming the spec.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from p2pfl.learning.datasets import DATASET_NAMES, Dataset, load_dataset
from p2pfl.learning.files import DataFileError, is_data_file, load_data_file
from p2pfl.learning.model import MODEL_NAMES, Model, build_model
from p2pfl.learning.partition import node_shard


class PluginError(ValueError):
    """A model or data spec that cannot be resolved, with a one-line reason."""


class LearningConfig(Protocol):
    """The config fields the built-ins read (NodeConfig has them all)."""

    @property
    def node_index(self) -> int: ...
    @property
    def nodes(self) -> int: ...
    @property
    def data_seed(self) -> int: ...
    @property
    def model_seed(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def partition(self) -> str: ...
    @property
    def alpha(self) -> float: ...
    @property
    def clusters(self) -> int: ...


def is_import_spec(spec: str) -> bool:
    """`pkg.mod:callable` or `file.py:callable`."""
    target, sep, attr = spec.rpartition(":")
    return bool(sep and target and attr.isidentifier())


def kind_of(spec: str, builtins: tuple[str, ...]) -> str:
    """'builtin', 'file' or 'import'; PluginError for anything else."""
    if spec in builtins:
        return "builtin"
    if is_data_file(spec) and builtins == DATASET_NAMES:
        return "file"
    if is_import_spec(spec):
        return "import"
    what = "data set" if builtins == DATASET_NAMES else "model"
    extra = ", a .npz or .csv file" if builtins == DATASET_NAMES else ""
    raise PluginError(
        f"unknown {what} {spec!r}: use a built-in ({', '.join(builtins)}){extra}, "
        "'package.module:callable' or 'path/to/file.py:callable'"
    )


def load_callable(spec: str) -> Callable[..., Any]:
    """Import `pkg.mod:attr` or `path/file.py:attr` and return the attribute."""
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"{spec!r}: no such file {path}")
        name = "p2pfl_plugin_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise PluginError(f"{spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise PluginError(f"{spec!r}: importing {path} failed: {_one_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise PluginError(f"{spec!r}: cannot import {target!r}: {_one_line(exc)}") from exc
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise PluginError(f"{spec!r}: {target} has no callable {attr!r}")
    return obj  # type: ignore[no-any-return]


def resolve_data(spec: str, config: LearningConfig, **file_options: Any) -> Dataset:
    """This node's data: `x_train`/`y_train` are what it trains on, `x_test`/`y_test`
    what it evaluates on."""
    kind = kind_of(spec, DATASET_NAMES)
    if kind == "builtin":
        ds = load_dataset(spec, seed=config.data_seed)
        x, y = node_shard(
            ds,
            config.node_index,
            config.nodes,
            scheme=config.partition,
            alpha=config.alpha,
            seed=config.data_seed,
            clusters=config.clusters,
        )
        return Dataset(ds.name, x, y, ds.x_test, ds.y_test, n_classes=ds.n_classes)
    if kind == "file":
        path = spec.replace("{index}", str(config.node_index))
        # NodeConfig's data-file fields, read with getattr so LearningConfig stays the
        # built-ins' few (a program's own config object need not have them).
        options = {
            "label_column": getattr(config, "label_column", None),
            "n_classes": getattr(config, "classes", None),
            **file_options,
        }
        try:
            return load_data_file(path, seed=config.data_seed, **options)
        except DataFileError as exc:
            raise PluginError(str(exc)) from None
    data = _call(spec, config)
    if not isinstance(data, Dataset):
        raise PluginError(f"{spec!r} returned {type(data).__name__}, not a p2pfl Dataset")
    return data


def resolve_model(spec: str, config: LearningConfig, data: Dataset) -> Model:
    """A freshly initialized model; built-ins are sized from `data`."""
    kind = kind_of(spec, MODEL_NAMES)
    if kind == "builtin":
        return build_model(
            spec, data.n_features, data.n_classes, seed=config.model_seed, hidden=config.hidden
        )
    model = _call(spec, config)
    missing = [m for m in _MODEL_METHODS if not callable(getattr(model, m, None))]
    if missing or not isinstance(getattr(model, "num_params", None), int):
        gaps = ", ".join(missing) or "an int num_params"
        raise PluginError(f"{spec!r} returned {type(model).__name__}, which lacks {gaps}")
    params = model.get_params()
    if not isinstance(params, np.ndarray) or params.shape != (model.num_params,):
        raise PluginError(f"{spec!r}: get_params() must return a flat array of num_params")
    return model  # type: ignore[no-any-return]


_MODEL_METHODS = (
    "get_params",
    "set_params",
    "fit",
    "evaluate",
    "get_optimizer_state",
    "set_optimizer_state",
    "reset_optimizer",
)


def _call(spec: str, config: LearningConfig) -> Any:
    factory = load_callable(spec)
    try:
        inspect.signature(factory).bind(config)
    except TypeError:
        raise PluginError(f"{spec!r} must accept one argument (the node's config)") from None
    except ValueError:
        pass  # no signature to check (a builtin): just call it
    try:
        return factory(config)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"{spec!r} failed: {type(exc).__name__}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
