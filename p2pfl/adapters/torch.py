"""PyTorch adapter: a `torch.nn.Module` as a p2pfl `Model` (`pip install 'p2pfl[torch]'`).

Imports torch at module import; nothing in p2pfl imports this module unless a user does.

**One flat vector, no copy per step.** At construction every parameter (and, with
`buffers="shared"`, every float32 buffer of the state dict) is copied once into a single
flat float32 tensor and re-pointed to a view of it (`p.data = flat[a:b].view_as(p)`).
The optimizer's in-place updates then write straight into that vector: `get_params` is
one copy out, `set_params` one copy in, and a training step copies nothing. Whatever
re-points a parameter afterwards (`module.to(...)`, `module.half()`, assigning `p.data`)
breaks the aliasing; the adapter checks after every `fit` and in `get_params` and raises
RuntimeError rather than send stale values. `module.load_state_dict` copies in place and
is fine.

**Buffers (BatchNorm running statistics), a choice made with `buffers=`:**

* `"shared"` (default): the float32 buffers of the state dict (`running_mean`,
  `running_var`) follow the parameters in the flat vector and are aggregated like
  weights. The vector is then the whole model, which is what p2pfl assumes elsewhere:
  the aggregate a node evaluates (on a second instance that only receives
  `set_params`), a checkpoint and a late joiner all get statistics that match the
  weights. It is also what FedAvg over a `state_dict` does in most frameworks.
  `set_params` clamps shared BatchNorm running variances at 0, so a bad aggregate
  cannot turn evaluation into NaN.
* `"local"`: buffers stay out of the vector and each node keeps the statistics of its
  own data (FedBN, Li et al. 2021), which helps when the nodes' feature distributions
  differ. The vector then no longer describes the whole model: an instance that only
  receives `set_params` evaluates with its own (initial) statistics, so evaluate on the
  instance that trains.

Buffers that are not float32 (`num_batches_tracked`, an int64 step count) always stay
local. Local buffers are saved with the optimizer state (keys `buffer/<name>`), so a
checkpoint resumes exactly either way.

**Learning rate and batch size.** `fit` receives the node's `lr`; with `node_lr=True`
(default) it is written into every param group before training, and the factory's lr is
only a placeholder. `node_lr=False` keeps the factory's lr (e.g. Adam at 1e-3 while the
node's default suits SGD). `batch_size=` at construction likewise overrides the node's.

**Data.** `fit(x, y)` and `evaluate(x, y)` receive numpy arrays (the node's shard and
test set). Given `data=` (a pair of tensors or arrays, a `Dataset` or a `DataLoader`),
`fit` trains on that and ignores `x, y`; `test_data=` does the same for `evaluate`.
`input_shape=(1, 8, 8)` reshapes each flat batch before the forward pass.

**Determinism.** `fit` draws two seeds from its `rng`: one for a private
`torch.Generator` that shuffles (arrays, tensors, a `Dataset`), one for torch's global
generator, seeded inside `torch.random.fork_rng` (state restored afterwards) so dropout
and a user `DataLoader`'s own shuffling repeat too. In-process nodes that train at once
in threads share that global generator; for them only the shuffling is guaranteed.

**Metrics.** `evaluate` returns `{"loss", "accuracy"}` for `task="classification"` and
`{"loss"}` for `"regression"`: the metrics mapping issue 13 plans for
`Model.evaluate` (today's node still unpacks `(loss, accuracy)`; it will read the dict).
The loss must average over the batch (`reduction="mean"`, torch's default).

**Optimizer state** (for checkpoints) is `optimizer.state_dict()["state"]` flattened to
`"<param name>/<key>"` -> array, as float32 (floating state) or int32 (integer state):
the dtypes a checkpoint can store. Hyperparameters (`param_groups`) are not saved; they
come from the factory and the node's config. Optimizers whose state holds anything but
tensors and numbers (LBFGS keeps lists) cannot be checkpointed: ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from p2pfl.learning.model import MOMENTUM, check_flat_vector

F32 = npt.NDArray[np.float32]
Task = Literal["classification", "regression"]
BufferMode = Literal["shared", "local"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

_BUFFER_PREFIX = "buffer/"
_INT32_MAX = 2**31 - 1


def default_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with the numpy models' heavy-ball momentum; the lr is the node's (see module doc)."""
    return torch.optim.SGD(params, lr=0.01, momentum=MOMENTUM)


def pick_device(device: str | torch.device) -> torch.device:
    """`"auto"` is cuda when present, else cpu; asking for an absent cuda is a ValueError."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this torch build has no usable CUDA")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only cpu and cuda are supported")
    return dev


class _Slot:
    """One tensor of the module that lives at `flat[offset : offset + numel]`."""

    __slots__ = ("attr", "name", "numel", "offset", "owner", "shape")

    def __init__(
        self, name: str, owner: torch.nn.Module, attr: str, offset: int, shape: torch.Size
    ) -> None:
        self.name = name
        self.owner = owner
        self.attr = attr
        self.offset = offset
        self.shape = tuple(int(n) for n in shape)
        self.numel = math.prod(self.shape)

    def current(self) -> torch.Tensor:
        value = getattr(self.owner, self.attr)
        assert isinstance(value, torch.Tensor)
        return value


class _DpSgd:
    """Opacus's per-example gradients (a GradSampleModule's hooks on the module) and its
    DPOptimizer around the node's optimizer, which is rebuilt per `fit` because it
    needs the batch size to average by."""

    def __init__(self, module: torch.nn.Module, clip: float, noise: float, seed: int) -> None:
        try:
            from opacus import GradSampleModule
        except ImportError as exc:
            raise NotImplementedError(
                f"DP-SGD for the PyTorch adapter needs Opacus: pip install 'p2pfl[dp]' ({exc})"
            ) from None
        try:
            self.grad_sample = GradSampleModule(module)
        except Exception as exc:  # Opacus refuses layers it cannot do per example
            raise NotImplementedError(f"Opacus cannot do DP-SGD on this module: {exc}") from None
        self.clip = clip
        self.noise = noise
        # Seeded by the caller from OS entropy, never from a configured seed.
        self.generator = torch.Generator().manual_seed(seed % 2**63)

    def wrap(
        self, optimizer: torch.optim.Optimizer, batch_size: int
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.optim.Optimizer]:
        from opacus.optimizers import DPOptimizer

        dp = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise,
            max_grad_norm=self.clip,
            expected_batch_size=batch_size,
            generator=self.generator,
        )
        return self.grad_sample, dp


class TorchModel:
    """A `torch.nn.Module` with a loss, an optimizer factory and optional data, as a Model."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        loss: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        device: str | torch.device = "cpu",
        data: Any = None,
        test_data: Any = None,
        input_shape: Sequence[int] | None = None,
        task: Task = "classification",
        buffers: BufferMode = "shared",
        node_lr: bool = True,
        batch_size: int | None = None,
        eval_batch_size: int = 1024,
    ) -> None:
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if buffers not in ("shared", "local"):
            raise ValueError(f"buffers must be 'shared' or 'local', got {buffers!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.task: Task = task
        self.buffers: BufferMode = buffers
        self.node_lr = node_lr
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.input_shape = None if input_shape is None else tuple(int(n) for n in input_shape)
        self.device = pick_device(device)
        self.module = module.to(self.device)
        if loss is not None:
            self.loss: LossFn = loss
        elif task == "classification":
            self.loss = torch.nn.CrossEntropyLoss()
        else:
            self.loss = torch.nn.MSELoss()
        self._flat, self._slots, self._n_params = self._flatten()
        self._names = {id(s.current()): s.name for s in self._slots[: self._n_params_tensors]}
        self.optimizer = self._make_optimizer(optimizer or default_optimizer)
        self._local_buffers = self._find_local_buffers()
        # Shared running variances, which a vector from peers could make negative.
        self._variances = [
            (s.offset, s.offset + s.numel)
            for s in self._slots[self._n_params_tensors :]
            if s.attr == "running_var" and isinstance(s.owner, torch.nn.modules.batchnorm._NormBase)
        ]
        self._data = _as_source(data, "data")
        self._test_data = _as_source(test_data, "test_data")
        self._array_cache: tuple[Any, ...] | None = None
        self.prox_mu = 0.0  # FedProx's mu (`set_proximal`); 0 = plain training
        self._prox_anchor: torch.Tensor | None = None  # None: where `fit` starts
        self._dp: _DpSgd | None = None  # example-level DP-SGD through Opacus (`set_dp_sgd`)

    # --- construction ---------------------------------------------------------------------
    def _flatten(self) -> tuple[torch.Tensor, list[_Slot], int]:
        """Copy parameters (and shared buffers) into one flat tensor; re-point them to views."""
        entries: list[tuple[str, torch.nn.Module, str, torch.Tensor]] = []
        for name, param in self.module.named_parameters():
            owner, attr = self._owner(name)
            if param.dtype != torch.float32:
                raise ValueError(
                    f"parameter {name!r} is {param.dtype}; TorchModel needs float32 "
                    "(call module.float() first)"
                )
            entries.append((name, owner, attr, param))
        self._n_params_tensors = len(entries)
        if self.buffers == "shared":
            for name, buf in self._persistent_buffers():
                if buf.dtype == torch.float32:
                    owner, attr = self._owner(name)
                    entries.append((name, owner, attr, buf))
        total = sum(t.numel() for *_, t in entries)
        n_params = sum(t.numel() for *_, t in entries[: self._n_params_tensors])
        flat = torch.zeros(total, dtype=torch.float32, device=self.device)
        slots = []
        offset = 0
        with torch.no_grad():
            for name, owner, attr, tensor in entries:
                slot = _Slot(name, owner, attr, offset, tensor.shape)
                view = flat[offset : offset + slot.numel].view(tensor.shape)
                view.copy_(tensor)
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = view
                else:
                    setattr(owner, attr, view)
                slots.append(slot)
                offset += slot.numel
        return flat, slots, n_params

    def _owner(self, name: str) -> tuple[torch.nn.Module, str]:
        prefix, _, attr = name.rpartition(".")
        return self.module.get_submodule(prefix), attr

    def _persistent_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Buffers that are part of the state dict (non-persistent ones are constants)."""
        keys = set(self.module.state_dict(keep_vars=True))
        return [(n, b) for n, b in self.module.named_buffers() if n in keys]

    def _find_local_buffers(self) -> dict[str, tuple[torch.nn.Module, str]]:
        shared = {s.name for s in self._slots[self._n_params_tensors :]}
        return {
            name: self._owner(name) for name, _ in self._persistent_buffers() if name not in shared
        }

    def _make_optimizer(self, factory: OptimizerFactory) -> torch.optim.Optimizer:
        params = [s.current() for s in self._slots[: self._n_params_tensors]]
        opt = factory([p for p in params if isinstance(p, torch.nn.Parameter)])
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"optimizer factory returned {type(opt).__name__}, not an Optimizer")
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in self._names:
                    raise ValueError("the optimizer holds a tensor that is not a module parameter")
        return opt

    # --- parameters -----------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Length of the flat vector: parameters, then shared buffers."""
        return int(self._flat.numel())

    @property
    def num_samples(self) -> int | None:
        """Size of the training data given at construction (None: the node's shard)."""
        if self._data is None:
            return None
        kind, payload = self._data
        try:
            if kind == "tensors":
                return int(payload[0].shape[0])
            return len(payload.dataset if kind == "loader" else payload)
        except TypeError:
            return None  # an iterable dataset has no length

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the tensors inside the flat vector, in order."""
        return [(s.name, s.shape) for s in self._slots]

    def get_params(self) -> F32:
        self._check_views()
        flat = self._flat.detach()
        # Annotated so the result is typed even where torch is untyped (not installed).
        out: F32 = flat.numpy().copy() if flat.device.type == "cpu" else flat.cpu().numpy()
        return out

    def set_params(self, params: np.ndarray) -> None:
        """Overwrite the vector; shared BatchNorm running variances are clamped at 0.

        A variance below 0 (a Byzantine or badly quantized aggregate) would turn every
        evaluation into NaN until training had moved the statistics back; 0 is the
        nearest valid value.
        """
        self._check_vector(params, "params")
        with torch.no_grad():
            if self._flat.device.type == "cpu":
                self._flat.numpy()[...] = params  # one copy; read-only input is fine
            else:
                self._flat.copy_(torch.from_numpy(np.array(params)))
            for start, stop in self._variances:
                self._flat[start:stop].clamp_(min=0.0)

    def _check_vector(self, vec: np.ndarray, what: str) -> None:
        check_flat_vector(vec, self.num_params, what, f"this {type(self.module).__name__}")

    def _check_views(self) -> None:
        base = self._flat.data_ptr()
        for slot in self._slots:
            t = slot.current()
            if t.data_ptr() != base + 4 * slot.offset or tuple(t.shape) != slot.shape:
                raise RuntimeError(
                    f"{slot.name!r} no longer lives in the flat parameter vector: the module "
                    "was changed after TorchModel wrapped it (.to(), .half(), a new .data?)"
                )

    # --- optimizer state ------------------------------------------------------------------
    def get_optimizer_state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for p, entries in self.optimizer.state.items():
            name = self._names.get(id(p))
            if name is None:
                continue
            for key, value in entries.items():
                out[f"{name}/{key}"] = _to_array(value, f"{name}/{key}")
        for name, (owner, attr) in self._local_buffers.items():
            out[_BUFFER_PREFIX + name] = _to_array(getattr(owner, attr), name)
        return out

    def set_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the optimizer state (and local buffers) with `state`.

        Missing entries are fine (a fresh optimizer has none until its first step);
        unknown names, shapes that fit neither the parameter nor a scalar, and
        non-finite values are ValueErrors, and nothing is changed then.
        """
        params = {s.name: s.current() for s in self._slots[: self._n_params_tensors]}
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        buffers: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
                raise ValueError(f"optimizer state {key!r} must be a numeric numpy array")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"optimizer state {key!r} contains NaN or infinite values")
            if key.startswith(_BUFFER_PREFIX):
                name = key[len(_BUFFER_PREFIX) :]
                if name not in self._local_buffers:
                    raise ValueError(f"optimizer state {key!r}: no local buffer {name!r}")
                owner, attr = self._local_buffers[name]
                current = getattr(owner, attr)
                if tuple(value.shape) != tuple(current.shape):
                    raise ValueError(
                        f"optimizer state {key!r} has shape {value.shape}, "
                        f"buffer is {tuple(current.shape)}"
                    )
                buffers[name] = torch.from_numpy(np.array(value)).to(current.dtype)
                continue
            name, sep, entry = key.rpartition("/")
            if not sep or name not in params:
                raise ValueError(f"optimizer state {key!r} names no parameter of this module")
            p = params[name]
            if value.ndim and tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"optimizer state {key!r} has shape {value.shape}, parameter is "
                    f"{tuple(p.shape)}"
                )
            tensor = torch.from_numpy(np.array(value))
            if value.dtype.kind != "f":
                tensor = tensor.to(torch.int64)
            per_param.setdefault(id(p), {})[entry] = tensor
        order = [id(p) for group in self.optimizer.param_groups for p in group["params"]]
        missing = set(per_param) - set(order)
        if missing:
            raise ValueError("optimizer state given for parameters this optimizer does not train")
        current = self.optimizer.state_dict()
        loaded = {
            "state": {i: per_param[pid] for i, pid in enumerate(order) if pid in per_param},
            "param_groups": current["param_groups"],
        }
        self.optimizer.state.clear()
        try:
            self.optimizer.load_state_dict(loaded)
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            self.optimizer.load_state_dict(current)
            raise ValueError(f"optimizer state does not fit: {exc}") from None
        with torch.no_grad():
            for name, tensor in buffers.items():
                owner, attr = self._local_buffers[name]
                getattr(owner, attr).copy_(tensor)

    def reset_optimizer(self) -> None:
        self.optimizer.state.clear()

    def set_proximal(self, mu: float, anchor: np.ndarray | None = None) -> None:
        """FedProx: `fit` adds mu * (w - w_start) to every parameter's gradient (the
        gradient of mu/2 ||w - w_start||^2, w_start the parameters when `fit` starts),
        so each node's round stays near the model it started from. 0 = off, and `fit`
        is then exactly what it was. Shared buffers are not trained, so not pulled.
        With `anchor` (a flat vector), the pull is towards it instead (Ditto)."""
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"FedProx mu must be a finite number >= 0, got {mu!r}")
        if anchor is not None:
            self._check_vector(anchor, "proximal anchor")
        self.prox_mu = float(mu)
        self._prox_anchor = (
            None if anchor is None else torch.from_numpy(np.array(anchor)).to(self.device)
        )

    def _add_proximal(self, anchor: torch.Tensor) -> None:
        """p.grad += mu * (p - anchor view), one vectorised op per parameter tensor."""
        with torch.no_grad():
            for slot in self._slots[: self._n_params_tensors]:
                p = slot.current()
                if p.grad is None:
                    continue  # not trained this step (frozen or unused)
                start = anchor[slot.offset : slot.offset + slot.numel].view_as(p)
                p.grad.add_(p.detach() - start, alpha=self.prox_mu)

    # --- training and evaluation ----------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        rng: np.random.Generator,
    ) -> float:
        """Train for `epochs` passes; returns the sample-weighted mean loss of the last one."""
        batch_size = self.batch_size or batch_size
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs=} {batch_size=} {lr=}"
            )
        source = self._data or self._numpy_source(x, y)
        shuffle_seed, global_seed = (int(s) for s in rng.integers(0, 2**62, size=2))
        shuffler = torch.Generator().manual_seed(shuffle_seed)
        if self.node_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.module.training
        self.module.train()
        epoch_loss = 0.0
        anchor = None
        if self.prox_mu > 0:
            fixed = self._prox_anchor
            anchor = fixed if fixed is not None else self._flat.detach().clone()
        forward: Callable[[torch.Tensor], torch.Tensor] = self.module
        optimizer: torch.optim.Optimizer = self.optimizer
        if self._dp is not None:
            if anchor is not None:
                raise ValueError(
                    "FedProx (prox_mu > 0) and DP-SGD together are not supported by the "
                    "PyTorch adapter (Opacus rewrites each step's gradient); choose one"
                )
            forward, optimizer = self._dp.wrap(self.optimizer, batch_size)
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(global_seed)
                for _ in range(epochs):
                    total = torch.zeros((), dtype=torch.float64, device=self.device)
                    count = 0
                    for xb, yb in _batches(source, batch_size, shuffler):
                        xb, yb = self._prepare(xb, yb)
                        optimizer.zero_grad(set_to_none=True)
                        out = forward(xb)
                        loss = self.loss(out, self._target(yb, out))
                        torch.autograd.backward(loss)
                        if anchor is not None:
                            self._add_proximal(anchor)
                        optimizer.step()
                        total += loss.detach().double() * xb.shape[0]
                        count += int(xb.shape[0])
                    if count == 0:
                        raise ValueError("cannot fit on an empty dataset")
                    epoch_loss = float(total.item()) / count
        finally:
            self.module.train(was_training)
        self._check_views()
        return epoch_loss

    def set_dp_sgd(self, clip: float, noise_multiplier: float, *, seed: int) -> None:
        """Example-level DP-SGD through Opacus from now on (`pip install 'p2pfl[dp]'`):
        Opacus computes per-example gradients with hooks on the module, clips each to
        L2 norm `clip` and adds N(0, (noise_multiplier * clip)^2) before every step of
        the node's own optimizer. `clip = 0` turns it off. NotImplementedError when
        Opacus is missing or cannot handle a layer of the module, so the node refuses
        to start rather than train without the privacy it was asked for.
        """
        if not (math.isfinite(clip) and clip >= 0):
            raise ValueError(f"DP-SGD clip must be a finite number >= 0, got {clip!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"DP-SGD noise multiplier must be >= 0, got {noise_multiplier!r}")
        if clip == 0:
            self._dp = None
            return
        self._dp = _DpSgd(self.module, clip, noise_multiplier, seed)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Mean loss (and accuracy for classification) on `test_data`, else on `x, y`."""
        source = self._test_data or self._numpy_source(x, y)
        was_training = self.module.training
        self.module.eval()
        loss_sum = 0.0
        correct = 0
        count = 0
        try:
            with torch.no_grad():
                for xb, yb in _batches(source, self.eval_batch_size, None):
                    xb, yb = self._prepare(xb, yb)
                    out = self.module(xb)
                    target = self._target(yb, out)
                    n = int(xb.shape[0])
                    loss_sum += float(self.loss(out, target).item()) * n
                    if self.task == "classification":
                        correct += int((out.argmax(dim=1) == target).sum().item())
                    count += n
        finally:
            self.module.train(was_training)
        if count == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        metrics = {"loss": loss_sum / count}
        if self.task == "classification":
            metrics["accuracy"] = correct / count
        return metrics

    def _prepare(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb = xb.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.input_shape is not None:
            xb = xb.reshape(xb.shape[0], *self.input_shape)
        return xb, yb.to(self.device, non_blocking=True)

    def _target(self, yb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return yb.long()
        yb = yb.float()
        if yb.shape != out.shape and yb.numel() == out.numel():
            yb = yb.reshape(out.shape)
        return yb

    def _numpy_source(self, x: np.ndarray, y: np.ndarray) -> tuple[str, Any]:
        """The node's arrays as CPU tensors; read-only arrays (the node's shards, which never
        change) are copied once and cached, writable ones are shared without a copy."""
        cache = self._array_cache
        if cache is not None and cache[0] is x and cache[1] is y:
            return ("tensors", cache[2])
        x32 = np.asarray(x, dtype=np.float32)
        yy = np.asarray(y, dtype=np.int64 if self.task == "classification" else np.float32)
        if x32.ndim < 1 or yy.ndim < 1 or x32.shape[0] != yy.shape[0]:
            raise ValueError(f"x and y must have the same length, got {x32.shape} and {yy.shape}")
        if self.input_shape is not None and math.prod(x32.shape[1:]) != math.prod(self.input_shape):
            raise ValueError(
                f"x has samples of shape {x32.shape[1:]}, which cannot be viewed as "
                f"input_shape {self.input_shape}"
            )
        pair = (_tensor(x32), _tensor(yy))
        if not (_writeable(x) or _writeable(y)):
            self._array_cache = (x, y, pair)
        return ("tensors", pair)


def _writeable(a: object) -> bool:
    return not isinstance(a, np.ndarray) or bool(a.flags.writeable)


def _tensor(a: np.ndarray) -> torch.Tensor:
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, order="C")  # torch refuses to alias read-only memory
    return torch.from_numpy(a)


def _as_source(data: Any, what: str) -> tuple[str, Any] | None:
    """Normalize user data to ("tensors", (x, y)), ("dataset", ds) or ("loader", dl)."""
    if data is None:
        return None
    if isinstance(data, torch.utils.data.DataLoader):
        return ("loader", data)
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) >= 2:
        return ("tensors", (data.tensors[0], data.tensors[1]))
    if isinstance(data, torch.utils.data.Dataset):
        return ("dataset", data)
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = (t if isinstance(t, torch.Tensor) else _tensor(np.asarray(t)) for t in data)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: x and y differ in length ({x.shape[0]} vs {y.shape[0]})")
        return ("tensors", (x, y))
    raise ValueError(
        f"{what} must be a pair (x, y) of tensors or arrays, a Dataset or a DataLoader, "
        f"got {type(data).__name__}"
    )


def _batches(
    source: tuple[str, Any], batch_size: int, shuffler: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of `source`, shuffled by `shuffler` (None: in order)."""
    kind, payload = source
    if kind == "tensors":
        x, y = payload
        n = int(x.shape[0])
        order = torch.randperm(n, generator=shuffler) if shuffler is not None else None
        for start in range(0, n, batch_size):
            if order is None:
                yield x[start : start + batch_size], y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]
        return
    if kind == "dataset":
        payload = torch.utils.data.DataLoader(
            payload, batch_size=batch_size, shuffle=shuffler is not None, generator=shuffler
        )
    for batch in payload:
        yield batch[0], batch[1]


def _to_array(value: object, key: str) -> np.ndarray:
    """A state entry as a float32 / int32 numpy array (the dtypes checkpoints store)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_floating_point():
            return np.array(t.to(torch.float32).numpy(), dtype=np.float32)
        if not t.dtype.is_complex:
            t = t.to(torch.int64).clamp(-_INT32_MAX - 1, _INT32_MAX)
            return np.array(t.numpy(), dtype=np.int32)
    elif isinstance(value, bool | int):
        return np.array(min(int(value), _INT32_MAX), dtype=np.int32)
    elif isinstance(value, float):
        return np.array(value, dtype=np.float32)
    raise ValueError(
        f"optimizer state {key!r} is a {type(value).__name__}; only tensors and numbers "
        "can go into a checkpoint"
    )
