"""A device's own data from a file: `.npz` (arrays `x`, `y`) or `.csv` (header row).

The data on a device is the user's, so nothing here rescales it: every node of a
federation must see features on the same scale, and per-device standardization would
quietly give each node a different one. Preprocess before writing the file.

Every problem is a `DataFileError` whose message names the file and the problem in one
line (missing array, ragged or mismatched shapes, NaN/Inf, labels that are not
integers in [0, n_classes), too few samples), so `p2pfl node --data FILE` can print it
as it is.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

from p2pfl.learning.datasets import Dataset, stratified_split

MIN_TRAIN_SAMPLES = 2
DATA_SUFFIXES = (".npz", ".csv")


class DataFileError(ValueError):
    """A data file that cannot be used, with a one-line reason naming the file."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def is_data_file(spec: str) -> bool:
    """Whether a `--data` value names a file (by suffix) rather than a built-in set."""
    return spec.lower().endswith(DATA_SUFFIXES)


def load_data_file(
    path: str | Path,
    *,
    n_classes: int | None = None,
    label_column: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load a device's data; without test arrays, split off a seeded stratified test set.

    `n_classes` should be given by the federation (every node must agree on it); by
    default it is the largest label + 1, which is right only when every device sees
    the largest class.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileError(p, "no such file")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        if label_column is not None:
            raise DataFileError(p, "label_column applies to .csv files only")
        x, y, x_test, y_test = _read_npz(p)
    elif suffix == ".csv":
        x, y = _read_csv(p, label_column)
        x_test = y_test = None
    else:
        raise DataFileError(p, f"unknown file type {suffix!r}; use .npz or .csv")
    x, y = _check_xy(p, x, y, "x", "y")
    if x_test is not None and y_test is not None:
        x_test, y_test = _check_xy(p, x_test, y_test, "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataFileError(
                p, f"x_test has samples of shape {x_test.shape[1:]}, x has {x.shape[1:]}"
            )
    labels_max = int(max(y.max(), -1 if y_test is None else y_test.max()))
    k = labels_max + 1 if n_classes is None else n_classes
    if k < 2:
        raise DataFileError(p, f"need at least 2 classes, got n_classes={k}")
    if labels_max >= k:
        raise DataFileError(p, f"label {labels_max} is outside [0, {k}) (n_classes={k})")
    if x_test is None or y_test is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        train_idx, test_idx = stratified_split(
            y, test_fraction, np.random.default_rng([seed, 0xF11E])
        )
        if train_idx.size < MIN_TRAIN_SAMPLES or test_idx.size < 1:
            raise DataFileError(
                p, f"too few samples ({y.size}) for a train/test split; add x_test, y_test"
            )
        x, y, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    arrays = (x, y, x_test, y_test)
    for a in arrays:
        a.setflags(write=False)
    return Dataset(str(p), *arrays, n_classes=k)


def _read_npz(p: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    try:
        if not zipfile.is_zipfile(p):  # np.load would try it as a pickle and say so
            raise DataFileError(
                p, "not a readable .npz file (not a zip archive: write it with numpy.savez)"
            )
        # allow_pickle=False: a data file must never run code.
        with np.load(p, allow_pickle=False) as npz:
            names = set(npz.files)
            missing = [n for n in ("x", "y") if n not in names]
            if missing:
                raise DataFileError(
                    p, f"missing array {missing[0]!r} (has: {', '.join(sorted(names)) or 'none'})"
                )
            if ("x_test" in names) != ("y_test" in names):
                raise DataFileError(p, "x_test and y_test must come together")
            x_test = npz["x_test"] if "x_test" in names else None
            y_test = npz["y_test"] if "y_test" in names else None
            return npz["x"], npz["y"], x_test, y_test
    except DataFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataFileError(p, f"not a readable .npz file ({exc})") from None


def _read_csv(p: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with p.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataFileError(p, f"not a readable .csv file ({exc})") from None
    if not rows:
        raise DataFileError(p, "empty file")
    header, body = rows[0], [r for r in rows[1:] if r]
    if len(header) < 2:
        raise DataFileError(p, "need a header row with at least one feature and a label")
    label = header[-1] if label_column is None else label_column
    if label not in header:
        raise DataFileError(p, f"no column {label!r} in the header ({', '.join(header)})")
    j = header.index(label)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataFileError(p, f"line {line} has {len(row)} fields, the header {len(header)}")
    try:
        table = np.array(body, dtype=np.float64).reshape(len(body), len(header))
    except ValueError as exc:
        raise DataFileError(p, f"non-numeric value ({exc})") from None
    return np.delete(table, j, axis=1), table[:, j]


def _check_xy(
    p: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str
) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype == object or y.dtype == object:
        raise DataFileError(p, f"{xname} and {yname} must be numeric arrays")
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
        raise DataFileError(p, f"{xname} must be a numeric array (samples, features...)")
    if y.ndim != 1:
        raise DataFileError(p, f"{yname} must be 1-D, got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataFileError(p, f"{xname} has {x.shape[0]} samples, {yname} has {y.shape[0]}")
    if x.shape[0] == 0:
        raise DataFileError(p, f"{xname} has no samples")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        bad = int(np.flatnonzero(~np.isfinite(xf).reshape(len(xf), -1).all(axis=1))[0])
        raise DataFileError(p, f"{xname} has NaN or Inf (first in sample {bad})")
    yf = np.asarray(y)
    if not (np.issubdtype(yf.dtype, np.integer) or np.issubdtype(yf.dtype, np.floating)):
        raise DataFileError(p, f"{yname} must hold integer class labels")
    if np.issubdtype(yf.dtype, np.floating) and not (
        np.isfinite(yf).all() and (yf == np.round(yf)).all()
    ):
        raise DataFileError(p, f"{yname} has non-integer labels")
    if (yf < 0).any():
        raise DataFileError(p, f"{yname} has negative labels")
    return xf.reshape(len(xf), -1), yf.astype(np.int64)
