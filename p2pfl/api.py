"""Run a node from a Python program: `run_node` (blocking) and `open_node` (async).

The CLI's `p2pfl node` is one way to start a node; a program that has its own model
and its own data needs another, without writing a TOML file or a plugin module:

* `run_node(config, model=..., data=...)` runs trio, returns the node's history once
  `rounds` rounds are done, and stops cleanly (goodbye to peers) on Ctrl-C or SIGTERM,
  like `p2pfl node`;
* `open_node(...)` is the same node for a program that already runs trio: an async
  context manager that starts it, yields the running `Node` (`done`, `history`,
  `status()`, `listen_addresses`) and says goodbye when the block ends.

Both take the configuration the way a person has it at hand: a `NodeConfig`, a dict of
fields, a path to a node TOML file, or nothing, plus keyword fields on top
(`run_node(listen="127.0.0.1:0", rounds=5, model=..., data=...)`). Every mistake is a
one-line `ConfigError` raised before anything touches the disk or the network.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from p2pfl.config import ConfigError, NodeConfig, coerce, load_config_file
from p2pfl.fatal import CannotBind, FatalError
from p2pfl.identity import Identity
from p2pfl.learning.datasets import Dataset
from p2pfl.learning.model import Model
from p2pfl.logs import event
from p2pfl.node import Node

log = logging.getLogger("p2pfl.node")

ConfigLike = NodeConfig | Mapping[str, Any] | str | os.PathLike[str] | None
"""A NodeConfig, a dict of its fields, a path to a node TOML file, or None (defaults)."""
ModelLike = Model | Callable[[NodeConfig], Model] | str | None
"""A Model, a factory called with the node's config, a spec string ('softmax',
'pkg.mod:build', 'my_model.py:build'), or None (the config's `model`)."""
DataLike = Dataset | str | None
"""A Dataset, a spec string ('digits', 'mine.npz', 'pkg.mod:load'), or None (the
config's `dataset`)."""


def run_node(
    config: ConfigLike = None,
    /,
    *,
    model: ModelLike = None,
    data: DataLike = None,
    identity: Identity | None = None,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Run one node until `rounds` rounds are done; return its history (one dict per round).

    Blocks, like `p2pfl node`. Ctrl-C or SIGTERM stops the node cleanly (it tells its
    peers it leaves) and returns the rounds done so far, so `len(history) < rounds`
    says it was stopped; with `rounds=0` it runs until then. Signals are handled only
    when called from the main thread (trio's rule); in another thread the node runs
    until its rounds are done.

    Raises `ConfigError` (a bad field, model or data: one line) before the node starts,
    or a `FatalError` (`CannotBind`, `DataDirInUse`, `DataDirUnusable`, `DiskFull`).
    """
    cfg = make_config(config, model=model, data=data, **fields)
    handle_signals = threading.current_thread() is threading.main_thread()
    return trio.run(_run_until_done, cfg, model, data, identity, handle_signals)


async def _run_until_done(
    cfg: NodeConfig,
    model: ModelLike,
    data: DataLike,
    identity: Identity | None,
    handle_signals: bool,
) -> list[dict[str, Any]]:
    if not handle_signals:
        async with open_node(cfg, model=model, data=data, identity=identity) as node:
            await node.done.wait()
        return node.learner.all_rows()
    # Opened before the node is built, so a signal during start-up is a clean stop too.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            open_node(cfg, model=model, data=data, identity=identity) as node,
            trio.open_nursery() as waiters,
        ):

            async def until_done() -> None:
                await node.done.wait()
                waiters.cancel_scope.cancel()

            async def until_signal() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info(
                        "received %s: shutting down",
                        name,
                        extra=event("node.stopping", signal=name),
                    )
                    waiters.cancel_scope.cancel()
                    return

            waiters.start_soon(until_done)
            waiters.start_soon(until_signal)
        return node.learner.all_rows()


@asynccontextmanager
async def open_node(
    config: ConfigLike = None,
    /,
    *,
    model: ModelLike = None,
    data: DataLike = None,
    identity: Identity | None = None,
    **fields: Any,
) -> AsyncIterator[Node]:
    """Start a node in this trio program; yield it running; stop it when the block ends.

    Inside the block: `await node.done.wait()` (set once `rounds` rounds are done),
    `node.history`, `node.status()` (what `p2pfl status --json` shows),
    `node.listen_addresses` (the real port when listening on port 0) and `node.id`.
    Leaving the block (normally, by an exception or by cancellation) says goodbye to
    the peers and releases the data dir. Signals are the program's business here.
    """
    cfg = make_config(config, model=model, data=data, **fields)
    node = Node(cfg, model=_object_or_none(model), data=_object_or_none(data), identity=identity)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(node.run)
            except BaseException as exc:
                raise _unwrapped(exc, bind=cfg.listen) from None
            try:
                yield node
            except BaseException as exc:
                # Re-raised below, outside the nursery: the caller gets its own exception
                # back, not wrapped in an exception group.
                body_error = exc
            finally:
                with trio.CancelScope(shield=True):  # bounded: goodbye gives up after ~1.5 s
                    await node.stop()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the running node failed (e.g. DiskFull)
        raise _unwrapped(group) from None
    if body_error is not None:
        raise body_error


def make_config(
    config: ConfigLike = None,
    /,
    *,
    model: ModelLike = None,
    data: DataLike = None,
    **fields: Any,
) -> NodeConfig:
    """The validated NodeConfig for `run_node`/`open_node`: defaults < `config` < `fields`.

    Spec strings for `model`/`data` become the config's `model`/`dataset` fields (so
    the node resolves them like `--model`/`--dataset`); objects are checked here so a
    wrong argument fails with one line instead of deep inside the first round.
    """
    if isinstance(config, NodeConfig):
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(NodeConfig)}
    elif isinstance(config, Mapping):
        base = coerce(config, source="config")
    elif isinstance(config, str | os.PathLike):
        base = load_config_file(Path(config).expanduser())
    elif config is None:
        base = {}
    else:
        raise ConfigError(
            "config",
            f"expected a NodeConfig, a dict of fields or a TOML path, got {type(config).__name__}",
        )
    overrides = coerce(fields, source="keyword arguments")
    if isinstance(model, str):
        overrides["model"] = model
    else:
        _check_model(model)
    if isinstance(data, str):
        overrides["dataset"] = data
    else:
        _check_data(data)
    try:
        cfg = NodeConfig(**{**base, **overrides})
    except TypeError as exc:  # cannot happen after coerce, but never a traceback
        raise ConfigError("config", str(exc)) from None
    return cfg.replace(data_dir=Path(cfg.data_dir).expanduser()).validated()


def _object_or_none(value: Any) -> Any:
    """Spec strings went into the config; the node gets only objects."""
    return None if isinstance(value, str) else value


def _check_model(model: object) -> None:
    if model is None or isinstance(model, Model):
        return
    if type(model).__module__.split(".")[0] == "torch":
        raise ConfigError(
            "model",
            f"a {type(model).__name__} is a torch object, not a p2pfl Model: wrap the module "
            "in p2pfl.adapters.torch.TorchModel (pip install 'p2pfl[torch]')",
        )
    if not callable(model):
        raise ConfigError(
            "model",
            f"expected a p2pfl Model, a factory(config) -> Model or a spec string, "
            f"got {type(model).__name__}",
        )


def _check_data(data: object) -> None:
    if data is None:
        return
    if not isinstance(data, Dataset):
        raise ConfigError(
            "dataset",
            f"expected a p2pfl.Dataset or a spec string ('mine.npz', 'pkg.mod:load'), got "
            f"{type(data).__name__}; build one with Dataset(name, x_train, y_train, x_test, "
            "y_test, n_classes=...)",
        )
    for a, b in (("x_train", "y_train"), ("x_test", "y_test")):
        xa, yb = getattr(data, a), getattr(data, b)
        if len(xa) != len(yb):
            raise ConfigError("dataset", f"{a} has {len(xa)} samples but {b} has {len(yb)}")
        if len(xa) == 0:
            raise ConfigError("dataset", f"{a} has no samples")
    if data.x_train.shape[1:] != data.x_test.shape[1:]:
        raise ConfigError(
            "dataset",
            f"x_test samples have shape {data.x_test.shape[1:]}, x_train's "
            f"{data.x_train.shape[1:]}",
        )
    if data.n_classes < 1:
        raise ConfigError("dataset", f"n_classes must be >= 1, got {data.n_classes}")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _unwrapped(exc: BaseException, *, bind: str | None = None) -> BaseException:
    """What failed, as the one exception a caller can catch.

    trio wraps failures in exception groups; the caller wants the FatalError or
    ConfigError inside, and (`bind` = the listen address, while starting) an OSError
    of the listener as the CLI reports it: `CannotBind` with a hint.
    """
    leaves = _leaves(exc)
    for kind in (FatalError, ConfigError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    if bind is not None:
        from p2pfl.fatal import bind_error  # one wording for the CLI and the API

        cannot: CannotBind | None = bind_error(exc, bind)
        if cannot is not None:
            return cannot
    real = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    return real[0] if len(real) == 1 else exc


__all__ = ["make_config", "open_node", "run_node"]
