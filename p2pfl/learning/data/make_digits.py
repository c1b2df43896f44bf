"""Regenerate `digits.npz` (the `digits` dataset shipped with p2pfl) from scikit-learn.

    python p2pfl/learning/data/make_digits.py      # needs scikit-learn, run once

Why a copy: the 1797 8x8 digits are one small file inside scikit-learn, and depending
on scikit-learn (and SciPy) for it made the default dataset fail after a plain
`pip install p2pfl`. The copy keeps scikit-learn's order and values exactly (pixels are
integers 0..16, labels 0..9, both stored as uint8), so every accuracy measured before
stays valid; tests/test_scenario_papercuts.py compares the two whenever scikit-learn is
installed.

The data is the test set of the UCI "Optical Recognition of Handwritten Digits" data
set (E. Alpaydin, C. Kaynak, 1998), CC BY 4.0: see DIGITS-LICENSE.txt beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def main() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = np.asarray(bunch.data)
    target = np.asarray(bunch.target)
    images = data.astype(np.uint8)
    labels = target.astype(np.uint8)
    if not (np.array_equal(images, data) and np.array_equal(labels, target)):
        raise SystemExit("scikit-learn's digits are no longer small integers: not converted")
    out = Path(__file__).with_name("digits.npz")
    np.savez_compressed(out, images=images, labels=labels)
    print(f"wrote {out} ({out.stat().st_size} bytes): {images.shape[0]} digits")


if __name__ == "__main__":
    main()
