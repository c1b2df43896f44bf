"""A device's own data from .npz / .csv files, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from p2pfl.learning.files import DataFileError, is_data_file, load_data_file


def _npz(tmp: Path, name: str = "d.npz", **arrays: object) -> Path:
    path = tmp / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _blobs(n: int = 60, d: int = 4, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return rng.normal(size=(n, d)) + y[:, None], y


def test_npz_without_test_arrays_gets_a_seeded_stratified_split(tmp_path: Path) -> None:
    x, y = _blobs()
    path = _npz(tmp_path, x=x, y=y)
    a = load_data_file(path, seed=1)
    b = load_data_file(path, seed=1)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.n_classes == 3 and a.n_features == 4
    assert len(a.y_train) + len(a.y_test) == 60
    assert sorted(np.bincount(a.y_test).tolist()) == [4, 4, 4]  # 20% of each class
    np.testing.assert_array_equal(a.x_train, b.x_train)
    # Never rescaled: the federation must agree on the features' scale.
    assert np.isin(a.x_train, x.astype(np.float32)).all()


def test_npz_with_test_arrays_and_images_flattened(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 1, 8, 8))
    path = _npz(tmp_path, x=x, y=np.arange(10) % 2, x_test=x[:4], y_test=np.array([0, 1, 0, 1]))
    ds = load_data_file(path, n_classes=10)
    assert ds.x_train.shape == (10, 64) and ds.x_test.shape == (4, 64) and ds.n_classes == 10


def test_csv_with_header_and_label_column(tmp_path: Path) -> None:
    x, y = _blobs(30, 2)
    lines = ["a,label,b"] + [f"{r[0]},{c},{r[1]}" for r, c in zip(x, y, strict=True)]
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = load_data_file(path, label_column="label")
    assert ds.n_features == 2 and ds.n_classes == 3
    assert len(ds.y_train) + len(ds.y_test) == 30


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"x": np.zeros((4, 2))}, "missing array 'y'"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "x has 4 samples, y has 3"),
        ({"x": np.full((4, 2), np.nan), "y": np.zeros(4)}, "NaN or Inf"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1.5, 0, 1])}, "non-integer labels"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, "negative labels"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, 1])}, "too few samples"),
        ({"x": np.zeros((6, 2)), "y": np.zeros(6)}, "at least 2 classes"),
        ({"x": np.zeros(4), "y": np.zeros(4)}, "(samples, features...)"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4), "x_test": np.zeros((1, 2))}, "together"),
    ],
)
def test_bad_npz_files_name_the_file_and_the_problem(
    tmp_path: Path, arrays: dict[str, object], problem: str
) -> None:
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataFileError) as info:
        load_data_file(path)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message
    assert "\n" not in message


def test_label_outside_the_federations_class_count(tmp_path: Path) -> None:
    x, y = _blobs()
    with pytest.raises(DataFileError, match=r"label 2 is outside \[0, 2\)"):
        load_data_file(_npz(tmp_path, x=x, y=y), n_classes=2)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty file"),
        ("a,b\n1,0\n2\n", "line 3 has 1 fields"),
        ("a,b\n1,zero\n", "non-numeric"),
        ("label\n1\n", "header row"),
    ],
)
def test_bad_csv_files(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DataFileError, match=problem):
        load_data_file(path)


def test_not_a_file_or_pickled_arrays_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no such file"):
        load_data_file(tmp_path / "missing.npz")
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataFileError, match=r"not a readable \.npz"):
        load_data_file(garbage)
    pickled = _npz(tmp_path, "p.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DataFileError):
        load_data_file(pickled)


def test_is_data_file() -> None:
    assert is_data_file("shards/node-3.npz") and is_data_file("D.CSV")
    assert not is_data_file("digits") and not is_data_file("pkg.mod:build")
