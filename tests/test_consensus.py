"""The CHOCO consensus step for compressed gossip (p2pfl.compression.consensus)."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.aggregation import get_rule, mean
from p2pfl.compression import UpdateDecoder, UpdateEncoder, parse_pipeline
from p2pfl.compression.consensus import ConsensusRule, consensus_step

RING = 6
DIM = 400


def _ring_neighbours(n: int) -> list[list[int]]:
    return [sorted({(i - 1) % n, (i + 1) % n}) for i in range(n)]


def test_identity_compression_and_gamma_one_is_the_plain_average() -> None:
    rng = np.random.default_rng(1)
    models = rng.normal(size=(4, DIM)).astype(np.float32)
    weights = np.array([3.0, 1.0, 2.0, 5.0])
    for own in range(4):
        got = consensus_step(mean, models, weights, own, models[own], 1.0)
        np.testing.assert_allclose(got, mean(models, weights, models[own]), rtol=0, atol=1e-6)


def test_gamma_scales_the_step_and_keeps_what_compression_withheld() -> None:
    rng = np.random.default_rng(2)
    public = rng.normal(size=(3, DIM)).astype(np.float32)
    exact = public[1] + rng.normal(scale=0.1, size=DIM).astype(np.float32)  # unsent residual
    weights = np.ones(3)
    target = public.astype(np.float64).mean(axis=0)
    for gamma in (1.0, 0.5, 0.25):
        got = consensus_step(mean, public, weights, 1, exact, gamma)
        want = exact + gamma * (target - public[1])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The residual exact - x_hat survives the step untouched (it is sent later by EF).
    got = consensus_step(mean, public, weights, 1, exact, 0.5)
    plain_public = consensus_step(mean, public, weights, 1, public[1], 0.5)
    np.testing.assert_allclose(got - plain_public, exact - public[1], rtol=0, atol=1e-5)


def test_compressed_ring_copies_agree_and_the_consensus_step_preserves_the_sum() -> None:
    """Sender's x_hat == every receiver's copy, bit for bit, each round; and with the
    ring's symmetric weights (1/3 self and each neighbour) the step moves models only
    by differences of those shared copies, so the sum of all models is preserved
    (plain aggregation with the exact own model does not preserve it)."""
    pipeline = parse_pipeline(["delta", "topk:0.05", "quantize:8", "zstd:3"])
    neigh = _ring_neighbours(RING)
    enc = [UpdateEncoder(pipeline, keyframe_every=0, seed=i) for i in range(RING)]
    dec = [UpdateDecoder(DIM, max_frame_size=1 << 20) for _ in range(RING)]
    rng = np.random.default_rng(3)
    models = [rng.normal(size=DIM).astype(np.float32) for _ in range(RING)]
    plain_drift = 0.0
    for r in range(8):
        trained = [m + rng.normal(scale=0.3, size=DIM).astype(np.float32) for m in models]
        held: list[dict[int, np.ndarray]] = [{} for _ in range(RING)]
        own_public = []
        for i in range(RING):
            blob = enc[i].encode(trained[i], r)
            x_hat = enc[i].x_hat
            assert x_hat is not None
            own_public.append(x_hat)
            for j in neigh[i]:
                held[j][i] = dec[j].decode(f"n{i}", r, blob)
                assert np.array_equal(held[j][i], x_hat)
        new, plain = [], []
        for j in range(RING):
            order = sorted([j, *neigh[j]])
            w = np.ones(len(order))
            pub = np.stack([own_public[j] if i == j else held[j][i] for i in order])
            new.append(consensus_step(mean, pub, w, order.index(j), trained[j], 1.0))
            exact = np.stack([trained[j] if i == j else held[j][i] for i in order])
            plain.append(mean(exact, w, trained[j]))
        before = np.sum(trained, axis=0, dtype=np.float64)
        np.testing.assert_allclose(np.sum(new, axis=0, dtype=np.float64), before, atol=1e-4)
        plain_drift = max(
            plain_drift, float(np.abs(np.sum(plain, axis=0, dtype=np.float64) - before).max())
        )
        models = new
    assert plain_drift > 0.1  # the property is not trivially true of any aggregate


def test_a_robust_rule_over_public_copies_still_discards_an_outlier() -> None:
    rng = np.random.default_rng(4)
    honest = rng.normal(size=(6, DIM)).astype(np.float32)
    public = np.vstack([honest, np.full((1, DIM), 1e6, dtype=np.float32)])
    weights = np.ones(7)
    exact = honest[0] + np.float32(0.05)
    robust = consensus_step(get_rule("median"), public, weights, 0, exact, 0.5)
    assert np.abs(robust - exact).max() < 10.0  # moved by a median step, not by the outlier
    averaged = consensus_step(mean, public, weights, 0, exact, 0.5)
    assert np.abs(averaged - exact).max() > 1e4  # the mean is dragged: the check can fail


def test_the_rule_sees_only_public_copies_with_the_own_copy_as_reference() -> None:
    seen: dict[str, np.ndarray] = {}

    def spy(x: np.ndarray, w: np.ndarray, own: np.ndarray) -> np.ndarray:
        seen["x"], seen["own"] = x.copy(), own.copy()
        return np.asarray(x.mean(axis=0), dtype=np.float32)

    public = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
    exact = np.full(8, 1000.0, dtype=np.float32)
    consensus_step(spy, public, np.ones(3), 2, exact, 1.0)
    assert np.array_equal(seen["x"], public)
    assert np.array_equal(seen["own"], public[2])


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan")])
def test_step_size_out_of_range_is_refused(gamma: float) -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="consensus step"):
        consensus_step(mean, x, np.ones(2), 0, x[0], gamma)


def test_keep_equal_to_the_self_weight_is_the_plain_aggregate_of_the_exact_own_model() -> None:
    """keep = w_ii, gamma = 1: rule(x_i, x_hat_j) exactly; keep = 1 differs from it by
    (1 - w_ii)(x_i - x_hat_i), the unsent part CHOCO keeps whole."""
    rng = np.random.default_rng(5)
    public = rng.normal(size=(3, DIM)).astype(np.float32)
    exact = public[0] + rng.normal(scale=0.2, size=DIM).astype(np.float32)
    weights = np.array([2.0, 1.0, 1.0])
    w_ii = 0.5
    plain = mean(np.vstack([exact, public[1:]]), weights, exact)
    got = consensus_step(mean, public, weights, 0, exact, 1.0, keep=w_ii)
    np.testing.assert_allclose(got, plain, rtol=0, atol=1e-5)
    choco = consensus_step(mean, public, weights, 0, exact, 1.0)
    np.testing.assert_allclose(choco - plain, (1 - w_ii) * (exact - public[0]), atol=1e-5)


@pytest.mark.parametrize("keep", [-0.1, 1.1, float("nan")])
def test_keep_out_of_range_is_refused(keep: float) -> None:
    x = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="keep"):
        consensus_step(mean, x, np.ones(2), 0, x[0], 1.0, keep=keep)


def test_the_node_wrapper_on_a_compressed_ring_equals_the_step_on_public_copies() -> None:
    """ConsensusRule gets what the round machine gives a rule (the exact own model among
    the neighbours' copies) and the encoder's x_hat; it must compute the step above."""
    pipeline = parse_pipeline(["delta", "topk:0.05", "quantize:4", "zstd:3"])
    neigh = _ring_neighbours(RING)
    enc = [UpdateEncoder(pipeline, keyframe_every=0, seed=i) for i in range(RING)]
    dec = [UpdateDecoder(DIM, max_frame_size=1 << 20) for _ in range(RING)]
    rng = np.random.default_rng(6)
    models = [rng.normal(size=DIM).astype(np.float32) for _ in range(RING)]
    for r in range(5):
        trained = [m + rng.normal(scale=0.3, size=DIM).astype(np.float32) for m in models]
        held: list[dict[int, np.ndarray]] = [{} for _ in range(RING)]
        for i in range(RING):
            blob = enc[i].encode(trained[i], r)
            for j in neigh[i]:
                held[j][i] = dec[j].decode(f"n{i}", r, blob)
        new = []
        for j in range(RING):
            order = sorted([j, *neigh[j]])
            w = np.ones(len(order))
            exact = np.stack([trained[j] if i == j else held[j][i] for i in order])
            rule = ConsensusRule(mean, lambda j=j: enc[j].x_hat, 0.5, keep=0.6)
            got = rule(exact, w, trained[j])
            pub = exact.copy()
            pub[order.index(j)] = enc[j].x_hat
            want = consensus_step(mean, pub, w, order.index(j), trained[j], 0.5, keep=0.6)
            np.testing.assert_array_equal(got, want)
            assert rule.plain_rounds == 0
            new.append(got)
        models = new


@pytest.mark.parametrize(("gamma", "keep"), [(0.0, 1.0), (1.5, 1.0), (0.5, -0.1), (0.5, 2.0)])
def test_the_node_wrapper_refuses_out_of_range_values(gamma: float, keep: float) -> None:
    with pytest.raises(ValueError, match=r"consensus step|keep"):
        ConsensusRule(mean, lambda: None, gamma, keep)
