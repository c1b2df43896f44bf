"""Aggregation rules against slow, obvious references (Python loops, float64), plus
breakdown properties, fallbacks and option validation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.aggregation import RULE_NAMES, RULES, get_rule, make_rule, mean, sortnet

Ref = Callable[[list[list[float]], list[float]], list[float]]

# ---- slow references ------------------------------------------------------------------


def rows_of(x: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in x]


def columns(rows: list[list[float]]) -> list[list[float]]:
    return [[row[j] for row in rows] for j in range(len(rows[0]))]


def ref_median(rows: list[list[float]]) -> list[float]:
    out = []
    for col in columns(rows):
        s = sorted(col)
        n = len(s)
        out.append(s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)
    return out


def ref_trimmed(rows: list[list[float]], b: int) -> list[float]:
    out = []
    for col in columns(rows):
        kept = sorted(col)[b : len(col) - b]
        out.append(sum(kept) / len(kept))
    return out


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b, strict=True)))


def ref_krum_scores(rows: list[list[float]], f: int) -> list[float]:
    n = len(rows)
    scores = []
    for i in range(n):
        others = sorted(dist(rows[i], rows[j]) ** 2 for j in range(n) if j != i)
        scores.append(sum(others[: n - f - 2]))
    return scores


def ref_mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in columns(rows)]


def ref_geomed(rows: list[list[float]], iterations: int, eps: float) -> list[float]:
    n = len(rows)
    total = [sum(dist(rows[i], rows[j]) for j in range(n)) for i in range(n)]
    medoid = min(range(n), key=lambda i: (total[i], i))
    near = sorted(range(n), key=lambda j: (dist(rows[medoid], rows[j]), j))[: n // 2 + 1]
    z = ref_mean([rows[j] for j in near])
    objective = sum(dist(r, z) for r in rows)
    for _ in range(iterations):
        alpha = [1.0 / max(dist(r, z), eps) for r in rows]
        z = [sum(a * r[k] for a, r in zip(alpha, rows, strict=True)) / sum(alpha) for k in
             range(len(z))]  # fmt: skip
        new = sum(dist(r, z) for r in rows)
        if objective - new <= 1e-6 * objective:
            break
        objective = new
    return z


def ref_tau(distances: list[float], f: int) -> float:
    desc = sorted(distances, reverse=True)
    return desc[f] if f < len(desc) else 0.0


def ref_clip_step(
    rows: list[list[float]], v: list[float], f: int, tau: float | None
) -> list[float]:
    n = len(rows)
    ds = [dist(r, v) for r in rows]
    radius = ref_tau(ds, f) if tau is None else tau
    out = list(v)
    for r, d in zip(rows, ds, strict=True):
        c = 1.0 if d <= radius or d == 0 else radius / d
        for k in range(len(v)):
            out[k] += c * (r[k] - v[k]) / n
    return out


def ref_cc(
    rows: list[list[float]], own: list[float], f: int, tau: float | None, it: int
) -> list[float]:
    v = list(own)
    for _ in range(it):
        v = ref_clip_step(rows, v, f, tau)
    return v


# ---- generators -----------------------------------------------------------------------


def stack(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Continuous random values: ties (which references may break differently) have
    probability zero, so reference comparisons can be exact up to rounding."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * scale).astype(np.float32)


shapes = st.tuples(st.integers(1, 13), st.integers(1, 9), st.integers(0, 2**32 - 1))


def weights_of(n: int) -> np.ndarray:
    return np.ones(n)  # equal sample counts (robust rules ignore them anyway)


def close(out: np.ndarray, ref: list[float], x: np.ndarray) -> None:
    scale = float(np.abs(x).max()) + 1.0
    np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-5, atol=1e-5 * scale)


# ---- each rule against its reference ----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_median_matches_reference(shape: tuple[int, int, int]) -> None:
    n, d, seed = shape
    x = stack(n, d, seed)
    out = make_rule("median")(x, weights_of(n), x[0])
    assert out.dtype == np.float32 and out.shape == (d,)
    close(out, ref_median(rows_of(x)), x)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 4), st.sampled_from([None, 0.05, 0.2, 0.34, 0.49]))
def test_trimmed_mean_matches_reference(
    shape: tuple[int, int, int], f: int, beta: float | None
) -> None:
    n, d, seed = shape
    x = stack(n, d, seed)
    options = {} if beta is None else {"beta": beta}
    out = make_rule("trimmed_mean", f=f, options=options)(x, weights_of(n), x[0])
    if beta is not None:
        b = max(1, math.floor(beta * n + 1e-9))
    else:
        b = f if f > 0 else (max(1, n // 10) if n >= 3 else 0)
    ref = ref_trimmed(rows_of(x), b) if 2 * b < n else ref_median(rows_of(x))
    close(out, ref, x)


def test_network_blocks_and_large_n_use_the_same_order_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Several column blocks (tiny BLOCK) and the introselect path (n > MAX_NETWORK_ROWS).
    monkeypatch.setattr(sortnet, "BLOCK", 7)
    for n in (2, 5, 8, 16, 33):
        x = stack(n, 23, n)
        close(sortnet.median(x), ref_median(rows_of(x)), x)
        for b in range(1, (n + 1) // 2):
            close(sortnet.trimmed_sum(x, b) / (n - 2 * b), ref_trimmed(rows_of(x), b), x)
    x = stack(sortnet.MAX_NETWORK_ROWS + 3, 5, 1)
    close(sortnet.median(x), ref_median(rows_of(x)), x)
    close(sortnet.trimmed_sum(x, 4) / (len(x) - 8), ref_trimmed(rows_of(x), 4), x)


def test_sorting_network_sorts_every_zero_one_input() -> None:
    # 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
    for n in range(1, 13):
        comps = sortnet.batcher_network(n)
        for bits in range(2**n):
            v = [(bits >> i) & 1 for i in range(n)]
            for a, b in comps:
                if v[a] > v[b]:
                    v[a], v[b] = v[b], v[a]
            assert v == sorted(v), (n, bits)


@settings(max_examples=50, deadline=None)
@given(shapes, st.integers(0, 3))
def test_krum_picks_the_reference_argmin(shape: tuple[int, int, int], f: int) -> None:
    n, d, seed = shape
    x = stack(n, d, seed)
    out = make_rule("krum", f=f)(x, weights_of(n), x[n // 2])
    if n == 1:
        np.testing.assert_array_equal(out, x[0])
    elif n < 2 * f + 3:
        close(out, ref_median(rows_of(x)), x)  # explicit fallback
    else:
        scores = ref_krum_scores(rows_of(x), f)
        best = min(range(n), key=lambda i: scores[i])
        np.testing.assert_array_equal(out, x[best])  # the input itself, bit for bit


@settings(max_examples=50, deadline=None)
@given(shapes, st.integers(0, 3), st.one_of(st.none(), st.integers(1, 15)))
def test_multi_krum_matches_reference(shape: tuple[int, int, int], f: int, m: int | None) -> None:
    n, d, seed = shape
    x = stack(n, d, seed)
    options = {} if m is None else {"m": m}
    out = make_rule("multi_krum", f=f, options=options)(x, weights_of(n), x[0])
    if n == 1:
        ref = rows_of(x)[0]
    elif n < 2 * f + 3:
        ref = ref_median(rows_of(x))
    else:
        scores = ref_krum_scores(rows_of(x), f)
        order = sorted(range(n), key=lambda i: scores[i])
        keep = min(n, n - f if m is None else m)
        ref = ref_mean([rows_of(x)[i] for i in order[:keep]])
    close(out, ref, x)


# d >= 2: on a line, every point between the two middle inputs has the same summed
# distance, so the medoid that seeds Weiszfeld is a tie broken by rounding.
@settings(max_examples=40, deadline=None)
@given(
    st.tuples(st.integers(1, 13), st.integers(2, 9), st.integers(0, 2**32 - 1)),
    st.sampled_from([1, 3, 10]),
    st.sampled_from([1e-6, 1e-2]),
)
def test_geometric_median_matches_weiszfeld_reference(
    shape: tuple[int, int, int], iterations: int, eps: float
) -> None:
    n, d, seed = shape
    x = stack(n, d, seed)
    rule = make_rule("geometric_median", options={"iterations": iterations, "eps": eps})
    out = rule(x, weights_of(n), x[0])
    np.testing.assert_allclose(out, ref_geomed(rows_of(x), iterations, eps), rtol=1e-4, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(
    shapes,
    st.integers(0, 4),
    st.sampled_from([None, 0.3, 2.0]),
    st.integers(1, 4),
)
def test_centered_clipping_matches_reference(
    shape: tuple[int, int, int], f: int, tau: float | None, iterations: int
) -> None:
    n, d, seed = shape
    x = stack(n, d, seed)
    options: dict[str, float] = {"iterations": iterations}
    if tau is not None:
        options["tau"] = tau
    out = make_rule("centered_clipping", f=f, options=options)(x, weights_of(n), x[-1])
    ref = rows_of(x)[0] if n == 1 else ref_cc(rows_of(x), rows_of(x)[-1], f, tau, iterations)
    close(out, ref, x)


@settings(max_examples=50, deadline=None)
@given(shapes, st.integers(0, 4), st.sampled_from([None, 0.3, 2.0]))
def test_self_centered_clipping_matches_reference(
    shape: tuple[int, int, int], f: int, tau: float | None
) -> None:
    n, d, seed = shape
    x = stack(n, d, seed)
    own = n // 3
    options = {} if tau is None else {"tau": tau}
    out = make_rule("self_centered_clipping", f=f, options=options)(x, weights_of(n), x[own])
    ref = rows_of(x)[0] if n == 1 else ref_clip_step(rows_of(x), rows_of(x)[own], f, tau)
    close(out, ref, x)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(2, 4), st.integers(0, 1000), st.sampled_from(["mean", "median"]))
def test_bucketing_averages_seeded_buckets_then_applies_the_inner_rule(
    shape: tuple[int, int, int], s: int, seed: int, inner: str
) -> None:
    n, d, data_seed = shape
    x = stack(n, d, data_seed)
    rule = make_rule(inner, options={"bucket_size": s, "bucket_seed": seed})
    rng = np.random.default_rng(seed)
    for _ in range(2):  # the generator advances from call to call
        out = rule(x, weights_of(n), x[0])
        if n == 1:
            close(out, rows_of(x)[0], x)
            continue
        perm = [int(i) for i in rng.permutation(n)]
        rows = rows_of(x)
        buckets = [ref_mean([rows[i] for i in perm[k : k + s]]) for k in range(0, n, s)]
        # The inner mean weighs each bucket by its summed sample counts (here: its size).
        ref = ref_mean(rows) if inner == "mean" else ref_median(buckets)
        if len(buckets) == 1:
            ref = buckets[0]
        close(out, ref, x)


def test_mean_is_sample_weighted() -> None:
    x = np.array([[0.0, 1.0], [4.0, 5.0]], dtype=np.float32)
    out = make_rule("mean")(x, np.array([3.0, 1.0]), x[0])
    np.testing.assert_allclose(out, [1.0, 2.0])
    assert RULES["mean"] is not None and get_rule("mean")(x, np.ones(2), x[0])[0] == 2.0
    assert mean(x, np.zeros(2), x[0])[0] == 2.0  # all-zero weights: uniform


def test_mean_is_within_float32_rounding_of_float64_and_survives_overflow() -> None:
    """One float32 BLAS pass: a few ulps from the float64 weighted mean; a product
    that overflows float32 at the edge of its range is redone in float64."""
    rng = np.random.default_rng(3)
    x = (1.0 + 0.01 * rng.standard_normal((13, 5000))).astype(np.float32)
    w = rng.integers(10, 100, 13).astype(np.float64)
    ref = (w / w.sum()) @ x.astype(np.float64)
    out = mean(x, w, x[0])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=4 * np.finfo(np.float32).eps)
    big = np.finfo(np.float32).max
    edge = np.full((10, 4), big, dtype=np.float32)
    with np.errstate(over="ignore"):  # 10 x float32(1/10) > 1: the float32 sum is inf
        assert not np.isfinite(np.einsum("i,ij->j", np.full(10, 0.1, np.float32), edge)).any()
    np.testing.assert_array_equal(mean(edge, np.ones(10), edge[0]), edge[0])


# ---- breakdown properties -------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(0, 2**32 - 1),
    st.data(),
)
def test_median_and_trimmed_mean_stay_in_the_honest_range(
    honest_extra: int, d: int, seed: int, data: st.DataObject
) -> None:
    f = data.draw(st.integers(0, 4))
    n = 2 * f + honest_extra  # f < n / 2
    honest = stack(n - f, d, seed, scale=10.0)
    bad = data.draw(hnp.arrays(np.float32, (f, d), elements=finite32))
    x = np.concatenate([honest, bad])[np.random.default_rng(seed).permutation(n)]
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    for rule in (make_rule("median", f=f), make_rule("trimmed_mean", f=f)):
        out = rule(np.ascontiguousarray(x), np.ones(n), honest[0])
        assert np.all(out >= lo) and np.all(out <= hi), rule.name


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.integers(1, 4), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_krum_picks_an_honest_input_when_attackers_are_far(
    f: int, extra: int, d: int, seed: int
) -> None:
    # Honest inputs within radius r of a centre; every Byzantine input farther than R from
    # all of them, with R^2 > 4 r^2 (n - f - 2): then no Byzantine score can win.
    n = 2 * f + 2 + extra
    rng = np.random.default_rng(seed)
    honest = rng.uniform(-1, 1, (n - f, d)).astype(np.float32)
    r = float(np.sqrt(d))
    far = 2 * r * math.sqrt(n) + 2 * r
    direction = rng.standard_normal((f, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    bad = (direction * far * rng.uniform(1, 5, (f, 1))).astype(np.float32)
    if f > 1 and rng.random() < 0.5:
        bad[:] = bad[0]  # colluding: all at one point
    x = np.ascontiguousarray(np.concatenate([bad, honest]))
    out = make_rule("krum", f=f)(x, np.ones(n), honest[0])
    assert any(np.array_equal(out, h) for h in honest)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1), st.floats(10, 1e6))
def test_geometric_median_and_clipping_resist_far_outliers(
    f: int, extra: int, seed: int, distance: float
) -> None:
    n = 2 * f + extra
    honest = stack(n - f, 5, seed)
    centre = honest.mean(axis=0)
    r = float(np.linalg.norm(honest - centre, axis=1).max())
    bad = np.full((f, 5), distance, dtype=np.float32)
    x = np.ascontiguousarray(np.concatenate([honest, bad]))
    own = honest[0]
    gm = make_rule("geometric_median", f=f)(x, np.ones(n), own)
    # Optimality bound of the geometric median: ||gm - c|| <= 2 (n - f) r / (n - 2f).
    assert np.linalg.norm(gm - centre) <= 2 * (n - f) * r / (n - 2 * f) + 1e-3
    # Clipping: the f farthest are clipped to the radius of the (f+1)-th farthest, which
    # is honest, so the result stays within 2r of own's neighbourhood.
    for name in ("self_centered_clipping", "centered_clipping"):
        out = make_rule(name, f=f)(x, np.ones(n), own)
        assert np.linalg.norm(out - own) <= 2 * r + 1e-3 + 2 * r * (name == "centered_clipping")


# ---- robustness of the implementation ---------------------------------------------------

ALL_RULES: list[tuple[str, dict[str, int]]] = [(name, {}) for name in RULE_NAMES] + [
    (name, {"bucket_size": 2}) for name in RULE_NAMES
]


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 9), st.integers(1, 5)),
        elements=finite32 | st.sampled_from([0.0, 1.0, -1.0, 1e-45]),
    ),
    st.integers(0, 3),
)
def test_no_rule_produces_nan_or_inf_from_finite_input(x: np.ndarray, f: int) -> None:
    n = x.shape[0]
    for name, options in ALL_RULES:
        for own in (x[0], x[-1]):
            out = make_rule(name, f=f, options=options)(x, np.ones(n), own)
            assert out.shape == (x.shape[1],) and out.dtype == np.float32
            assert np.isfinite(out).all(), (name, options)


@pytest.mark.parametrize(("name", "options"), ALL_RULES)
def test_extreme_finite_inputs_stay_finite(name: str, options: dict[str, int]) -> None:
    big = np.finfo(np.float32).max
    for x in (
        np.full((5, 3), big, dtype=np.float32),
        np.array([[big, -big], [-big, big], [big, big], [0, 0]], dtype=np.float32),
    ):
        for f in (0, 1):
            out = make_rule(name, f=f, options=options)(x, np.ones(len(x)), x[-1])
            assert np.isfinite(out).all(), (name, x, f)


@pytest.mark.parametrize(("name", "options"), ALL_RULES)
def test_single_input_returns_it_and_identical_inputs_are_a_fixed_point(
    name: str, options: dict[str, int]
) -> None:
    row = np.array([[1.5, -2.0, 3.0]], dtype=np.float32)
    rule = make_rule(name, f=2, options=options)
    np.testing.assert_array_equal(rule(row, np.ones(1), row[0]), row[0])
    same = np.repeat(row, 7, axis=0)
    np.testing.assert_allclose(rule(same, np.ones(7), row[0]), row[0], rtol=1e-6)


def test_too_few_inputs_fall_back_to_the_median_and_log_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x = stack(6, 4, 3)
    rule = make_rule("krum", f=2)  # needs n >= 7
    with caplog.at_level(logging.DEBUG, logger="p2pfl.aggregation"):
        out = rule(x, np.ones(6), x[0])
        rule(x, np.ones(6), x[0])
    close(out, ref_median(rows_of(x)), x)
    assert rule.fallbacks == 2 and rule.last_fallback is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "krum" in warnings[0].getMessage()  # once, then debug
    # Enough inputs: the rule itself runs and the note clears.
    y = stack(7, 4, 3)
    rule(y, np.ones(7), y[0])
    assert rule.last_fallback is None and rule.fallbacks == 2
    # A trimmed mean that would trim everything falls back the same way.
    tm = make_rule("trimmed_mean", f=3)
    close(tm(x, np.ones(6), x[0]), ref_median(rows_of(x)), x)
    assert tm.fallbacks == 1


def test_trimmed_mean_never_trims_nothing_when_attackers_are_declared() -> None:
    x = stack(10, 3, 0)
    x[0] = 1e6  # one outlier
    out = make_rule("trimmed_mean", f=1)(x, np.ones(10), x[1])
    close(out, ref_trimmed(rows_of(x), 1), x)
    assert np.abs(out).max() < 10
    with pytest.raises(ValueError, match="beta"):
        make_rule("trimmed_mean", f=2, options={"beta": 0.0})
    # f = 0 and no beta: still trims one per side.
    close(make_rule("trimmed_mean")(x, np.ones(10), x[1]), ref_trimmed(rows_of(x), 1), x)


@pytest.mark.parametrize(
    ("name", "f", "options", "needle"),
    [
        ("average", 0, {}, "average"),
        ("mean", -1, {}, "tolerate"),
        ("trimmed_mean", 0, {"beta": 0.5}, "beta"),
        ("trimmed_mean", 0, {"beta": "x"}, "beta"),
        ("krum", 0, {"beta": 0.1}, "beta"),
        ("multi_krum", 1, {"m": 0}, "'m'"),
        ("geometric_median", 0, {"iterations": 0}, "iterations"),
        ("geometric_median", 0, {"eps": -1.0}, "eps"),
        ("centered_clipping", 0, {"tau": 0}, "tau"),
        ("self_centered_clipping", 0, {"tau": True}, "tau"),
        ("median", 0, {"bucket_size": 1}, "bucket_size"),
        ("median", 0, {"bucket_size": 2.5}, "bucket_size"),
    ],
)
def test_bad_rule_names_and_options_raise_naming_them(
    name: str, f: int, options: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        make_rule(name, f=f, options=options)


def test_rule_names_are_the_contracted_ones() -> None:
    assert RULE_NAMES == (
        "mean",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "geometric_median",
        "centered_clipping",
        "self_centered_clipping",
        "clipped_gossip",
    )
    assert make_rule("median", options={"bucket_size": 2}).name == "median+bucketing(2)"
