"""Datasets: small, offline, deterministic.

Every node calls `load_dataset` independently and must see exactly the same split, so
everything here is a pure function of (name, seed, test_fraction). Results are cached
per process and their arrays are read-only, because up to hundreds of in-process nodes
share one copy.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

DATASET_NAMES = ("digits", "synthetic")

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class MissingExtra(ImportError):
    """A dataset needs an optional dependency that is not installed; the message is one
    line naming the pip command (the node reports it as a configuration error)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split; features float32 (standardized), labels int64 in [0, n_classes).

    `eq=False`: comparing numpy arrays field-wise is meaningless; identity is what the
    per-process caches rely on.
    """

    name: str
    x_train: F32
    y_train: I64
    x_test: F32
    y_test: I64
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def load_dataset(name: str, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load `name` and split it with a seeded stratified permutation (cached per process)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return _load_split(name, seed, float(test_fraction))


@functools.lru_cache(maxsize=16)
def _load_split(name: str, seed: int, test_fraction: float) -> Dataset:
    x, y, n_classes = _LOADERS[name](seed)
    rng = np.random.default_rng([seed, 0x5EED])
    train_idx, test_idx = stratified_split(y, test_fraction, rng)
    x_train, x_test = x[train_idx], x[test_idx]
    # Standardize with train statistics only; constant features (digit borders) keep std 1.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std < 1e-6] = 1.0
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    arrays = (x_train, y[train_idx], x_test, y[test_idx])
    for a in arrays:
        a.setflags(write=False)
    return Dataset(name, *arrays, n_classes=n_classes)


def stratified_split(y: I64, test_fraction: float, rng: np.random.Generator) -> tuple[I64, I64]:
    """Per class, a random `test_fraction` of its samples goes to test; both sides shuffled."""
    test_parts = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test_parts.append(members[: round(test_fraction * members.size)])
    is_test = np.zeros(y.size, dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    test_idx = rng.permutation(np.flatnonzero(is_test))
    return train_idx, test_idx


# --- digits -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[F32, I64]:
    """The 1797 8x8 digits from scikit-learn's bundled CSV, without importing sklearn.

    `import sklearn` costs about a second; the data is a 1797x65 gzip CSV inside the
    package, so locate the package directory and read it with numpy. Fall back to the
    sklearn API only if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise MissingExtra(
            "the 'digits' dataset ships with scikit-learn, which is not installed; "
            "run: pip install 'p2pfl[digits]'"
        )
    for location in spec.submodule_search_locations or []:
        csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
            return table[:, :-1].copy(), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def _load_digits(seed: int) -> tuple[F32, I64, int]:
    del seed  # the data is fixed; only the split depends on the seed
    x, y = _digits_raw()
    return x / np.float32(16.0), y, 10


# --- synthetic ----------------------------------------------------------------------------
SYNTHETIC_SAMPLES = 6000
SYNTHETIC_FEATURES = 20
SYNTHETIC_CLASSES = 10
SYNTHETIC_SEPARATION = 0.75
"""Std of the class means relative to unit noise; tuned so softmax reaches ~0.91 test accuracy."""


def _load_synthetic(seed: int) -> tuple[F32, I64, int]:
    """Gaussian clusters around random class means, plus unit isotropic noise.

    Overlapping clusters keep the task short of perfect accuracy, so aggregation quality
    and attacks show up in the numbers. Fully determined by the seed; no download.
    """
    rng = np.random.default_rng([seed, 0x5717])
    means = rng.normal(0.0, SYNTHETIC_SEPARATION, size=(SYNTHETIC_CLASSES, SYNTHETIC_FEATURES))
    y = rng.integers(0, SYNTHETIC_CLASSES, size=SYNTHETIC_SAMPLES).astype(np.int64)
    noise = rng.normal(0.0, 1.0, size=(SYNTHETIC_SAMPLES, SYNTHETIC_FEATURES))
    return (means[y] + noise).astype(np.float32), y, SYNTHETIC_CLASSES


_LOADERS: dict[str, Callable[[int], tuple[F32, I64, int]]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
}
