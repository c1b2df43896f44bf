"""Model/task fingerprints: equal for the same setup, different for any mismatch."""

from __future__ import annotations

import numpy as np

from p2pfl.learning import build_model, load_dataset
from p2pfl.learning.datasets import Dataset
from p2pfl.learning.fingerprint import fingerprint


def _fp(model: str = "mlp", hidden: int = 32, dataset: str = "digits") -> str:
    ds = load_dataset(dataset)
    m = build_model(model, ds.n_features, ds.n_classes, seed=0, hidden=hidden)
    return fingerprint(m, ds).digest


def test_same_setup_same_fingerprint_whatever_the_seed_or_weights() -> None:
    ds = load_dataset("digits")
    a = build_model("mlp", ds.n_features, ds.n_classes, seed=0)
    b = build_model("mlp", ds.n_features, ds.n_classes, seed=7)
    b.set_params(np.zeros(b.num_params, np.float32))
    assert fingerprint(a, ds).digest == fingerprint(b, ds).digest == _fp()
    assert len(_fp()) == 16


def test_any_mismatch_changes_it() -> None:
    prints = {_fp(), _fp(hidden=16), _fp(model="softmax"), _fp(dataset="synthetic")}
    assert len(prints) == 4


def test_same_count_different_layout_differs() -> None:
    # A (4 x 2) + (2,) softmax and a model with the same 10 parameters in other shapes.
    x = np.zeros((5, 4), np.float32)
    y = np.arange(5) % 2
    ds = Dataset("t", x, y, x, y, n_classes=2)
    softmax = build_model("softmax", 4, 2, seed=0)

    class Flat:
        num_params = softmax.num_params

    fp_softmax = fingerprint(softmax, ds)
    fp_flat = fingerprint(Flat(), ds)  # type: ignore[arg-type]
    assert fp_softmax.num_params == fp_flat.num_params
    assert fp_softmax.digest != fp_flat.digest
    assert fp_softmax.difference(fp_softmax.digest) is None
    assert "10 params" in (fp_softmax.difference(fp_flat.digest) or "")
