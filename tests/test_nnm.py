"""Nearest-neighbour mixing (`nnm = true` on any rule)."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.aggregation import make_rule
from p2pfl.aggregation.nnm import mix, mixing_matrix


def test_each_row_averages_its_n_minus_f_nearest_itself_included() -> None:
    # Points on a line: 0, 1, 2, 10, 11, 50 (d = 1).
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [50.0]], dtype=np.float32)
    a = mixing_matrix(x, x[0], f=2)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    assert (np.diag(a) == 0.25).all()
    np.testing.assert_allclose(a[0], [0.25, 0.25, 0.25, 0.25, 0, 0])
    np.testing.assert_allclose(a[5], [0, 0, 0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(mix(x, x[0], 2)[:, 0], [3.25, 3.25, 3.25, 6.0, 6.0, 18.25])


def test_identity_without_attackers() -> None:
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_array_equal(mix(x, x[0], 0), x)


def test_far_attackers_do_not_enter_honest_mixtures_and_the_spread_shrinks() -> None:
    rng = np.random.default_rng(1)
    n, f, d = 9, 2, 30
    honest = rng.standard_normal((n - f, d)).astype(np.float32)
    x = np.concatenate([honest, np.full((f, d), 1e3, np.float32)])
    mixed = mix(x, honest[0], f)
    a = mixing_matrix(x, honest[0], f)
    assert (a[: n - f, n - f :] == 0).all()
    spread = np.linalg.norm(honest - honest.mean(0), axis=1).max()
    mixed_spread = np.linalg.norm(mixed[: n - f] - honest.mean(0), axis=1).max()
    assert mixed_spread < spread / 2


def test_the_rule_runs_on_the_mixtures() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 12)).astype(np.float32)
    rule = make_rule("median", f=2, options={"nnm": True})
    assert rule.name == "median+nnm"
    out = rule(x, np.ones(7), x[0])
    np.testing.assert_allclose(out, np.median(mix(x, x[0], 2), axis=0), rtol=1e-6)
    assert not np.allclose(out, np.median(x, axis=0))


@pytest.mark.parametrize(
    ("options", "needle"),
    [({"nnm": "yes"}, "true or false"), ({"nnm": True, "bucket_size": 2}, "alternatives")],
)
def test_bad_options_are_named(options: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_rule("median", f=1, options=options)
