"""Fixed point in Z_2^32 and pairwise masks: exact cancellation, bounded quantization,
masked vectors that look uniform.

Chi-square tests use p > 1e-6 as "uniform" (a false failure once in a million runs) and
each comes with a control showing the same statistic catches structure.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import chisquare

from p2pfl.identity import Identity
from p2pfl.secure.masking import (
    BLOCK_WORDS,
    LIMIT,
    MAX_CLIP,
    MIN_CLIP,
    FixedPoint,
    MaskContext,
    SumRejected,
    add_streams,
    derive_seed,
    expand,
    fixed_point,
    mask_encoded,
)
from p2pfl.secure.round_keys import RoundKey, RoundScope

FED = "fed"
SCOPE = RoundScope(FED, 3, "leader", b"s" * 16, 0)
KEYS = [RoundKey(Identity.from_seed(bytes([70 + i]) * 32), SCOPE) for i in range(8)]
UNIFORM_P = 1e-6


def _group_vectors(
    keys: list[RoundKey], encoded: list[np.ndarray]
) -> tuple[list[np.ndarray], list[bytes]]:
    """What each member sends: its encoding plus pair masks and a self mask."""
    self_seeds = [bytes([i]) * 32 for i in range(len(keys))]
    out = []
    for me, enc, own in zip(keys, encoded, self_seeds, strict=True):
        seeds = {k.peer_id: me.pair_seed(k.peer_id, k.public) for k in keys if k is not me}
        out.append(mask_encoded(enc, me.peer_id, seeds, own))
    return out, self_seeds


def _byte_p_value(v: np.ndarray) -> float:
    counts = np.bincount(np.ascontiguousarray(v).view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


@settings(max_examples=40, deadline=None)
@given(
    g=st.integers(3, 8),
    clip=st.sampled_from([0.5, 4.0, 16.0]),
    data=st.data(),
)
def test_masks_cancel_and_the_group_mean_is_exact_up_to_quantization(
    g: int, clip: float, data: st.DataObject
) -> None:
    d = data.draw(st.integers(1, 300))
    values = hnp.arrays(
        np.float32,
        (g, d),
        elements=st.floats(-3 * clip, 3 * clip, width=32, allow_nan=False),
    )
    x = data.draw(values)
    codec = fixed_point(clip, g)
    encoded = [codec.encode(row) for row in x]
    masked, self_seeds = _group_vectors(KEYS[:g], encoded)
    total = np.zeros(d, dtype=np.uint32)
    for v in masked:
        total += v
    add_streams(total, minus=self_seeds)
    exact = np.zeros(d, dtype=np.uint32)
    for e in encoded:
        exact += e
    np.testing.assert_array_equal(total, exact)  # the masks cancel bit for bit
    mean = codec.decode_mean(total, g)
    expected = np.clip(x.astype(np.float64), -clip, clip).mean(axis=0)
    tol = 0.5 * codec.step + 2.0**-23 * clip
    assert np.max(np.abs(mean - expected)) <= tol


def test_masked_vectors_differ_from_the_encoding_everywhere_that_matters() -> None:
    codec = fixed_point(4.0, 3)
    encoded = [codec.encode(np.zeros(4096, dtype=np.float32)) for _ in range(3)]
    masked, _ = _group_vectors(KEYS[:3], encoded)
    for v in masked:
        assert np.count_nonzero(v == 0) < 10  # zeros would survive a broken mask


def test_fixed_point_bound_makes_overflow_impossible() -> None:
    for clip, n in [(1.0, 3), (16.0, 5), (1e6, 8), (3.3, 1024)]:
        codec = FixedPoint(clip, n)
        extreme = np.array([clip, -clip, 10 * clip, -10 * clip], dtype=np.float32)
        q = codec.encode(extreme).view(np.int32).astype(np.int64)
        assert np.all(np.abs(q) <= codec.bound)
        assert codec.bound * n <= LIMIT
        # n members all at +R (and all at -R) still decode to +R (-R).
        total = codec.encode(np.full(2, clip, dtype=np.float32)) * np.uint32(n)
        assert codec.decode_mean(total, n)[0] == pytest.approx(clip, rel=1e-6)
        total = codec.encode(np.full(2, -clip, dtype=np.float32)) * np.uint32(n)
        assert codec.decode_mean(total, n)[0] == pytest.approx(-clip, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    clip=st.floats(MIN_CLIP, MAX_CLIP, allow_nan=False),
    n=st.integers(1, 1024),
)
def test_scale_never_lets_n_clipped_values_overflow(clip: float, n: int) -> None:
    codec = FixedPoint(clip, n)
    extreme = np.array([clip, -clip, np.float32(clip), 3 * clip], dtype=np.float32)
    q = codec.encode(extreme).view(np.int32).astype(np.int64)
    assert np.all(np.abs(q) <= codec.bound) and codec.bound * n <= LIMIT
    assert codec.scale > 0 and np.isfinite(codec.scale)


def test_uncancelled_masks_are_detected() -> None:
    codec = fixed_point(4.0, 4)
    garbage = expand(b"\x07" * 32, 1000)
    with pytest.raises(SumRejected):
        codec.decode_mean(garbage, 4)
    # A group sum missing one member's vector is garbage too.
    encoded = [codec.encode(np.ones(1000, dtype=np.float32)) for _ in range(4)]
    masked, self_seeds = _group_vectors(KEYS[:4], encoded)
    partial = masked[0] + masked[1] + masked[2]
    add_streams(partial, minus=self_seeds[:3])
    with pytest.raises(SumRejected):
        codec.decode_mean(partial, 3)


def test_encode_refuses_non_finite_and_non_vectors() -> None:
    codec = fixed_point(1.0, 3)
    with pytest.raises(ValueError):
        codec.encode(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError):
        codec.encode(np.zeros((2, 2), dtype=np.float32))
    for clip, n in [(0.0, 3), (float("inf"), 3), (1.0, 0), (1e-30, 3), (2e6, 3)]:
        with pytest.raises(ValueError):
            FixedPoint(clip, n)


def test_pair_seed_info_is_symmetric_and_bound_to_every_context_field() -> None:
    ctx = SCOPE.mask_context()
    a, b = KEYS[0], KEYS[1]
    info = ctx.info(a.peer_id, a.public, b.peer_id, b.public)
    assert info == ctx.info(b.peer_id, b.public, a.peer_id, a.public)  # both sides agree
    # A round key's pair seed is exactly HKDF(X25519 agreement, this info), both ways.
    private = X25519PrivateKey.from_private_bytes(a.secret_bytes())
    secret = private.exchange(X25519PublicKey.from_public_bytes(b.public))
    seed = derive_seed(secret, info)
    assert seed == a.pair_seed(b.peer_id, b.public) == b.pair_seed(a.peer_id, a.public)
    variants = [
        MaskContext("other", 3, "leader", b"s" * 16, 0, 0),
        MaskContext(FED, 4, "leader", b"s" * 16, 0, 0),
        MaskContext(FED, 3, "other", b"s" * 16, 0, 0),
        MaskContext(FED, 3, "leader", b"t" * 16, 0, 0),
        MaskContext(FED, 3, "leader", b"s" * 16, 1, 0),
        MaskContext(FED, 3, "leader", b"s" * 16, 0, 1),
    ]
    infos = [c.info(a.peer_id, a.public, b.peer_id, b.public) for c in variants]
    infos.append(ctx.info(a.peer_id, a.public, KEYS[2].peer_id, b.public))  # another mate
    infos.append(ctx.info(a.peer_id, a.public, b.peer_id, KEYS[2].public))  # another key
    seeds = {derive_seed(secret, i) for i in infos}
    assert len(seeds) == len(infos) and seed not in seeds


def test_a_masked_vector_is_indistinguishable_from_uniform() -> None:
    """Very non-uniform updates (zeros, a ramp): every masked vector looks uniform."""
    d = 1 << 16  # 256 KiB of masked bytes: 1024 expected per byte value
    ramp = np.linspace(-1, 1, d, dtype=np.float32)
    codec = fixed_point(4.0, 3)
    encoded = [codec.encode(ramp * i if i % 2 else np.zeros(d, np.float32)) for i in range(3)]
    masked, _ = _group_vectors(KEYS[:3], encoded)
    for v in masked:
        assert _byte_p_value(v) > UNIFORM_P
    # Control: the same members' encodings are glaringly non-uniform.
    for e in encoded:
        assert _byte_p_value(e) < 1e-12


def test_expanded_mask_bytes_are_uniform() -> None:
    assert _byte_p_value(expand(b"\x01" * 32, 1 << 16)) > UNIFORM_P


def test_blockwise_streams_equal_one_aes256_ctr_keystream() -> None:
    d = 2 * BLOCK_WORDS + 5
    seed = bytes(range(32))
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    reference = np.frombuffer(enc.update(bytes(4 * d)), dtype="<u4")
    np.testing.assert_array_equal(expand(seed, d), reference)
    acc = np.full(d, 5, dtype=np.uint32)
    add_streams(acc, plus=[seed, seed], minus=[seed])
    np.testing.assert_array_equal(acc, reference + np.uint32(5))
    with pytest.raises(ValueError):
        add_streams(np.zeros(3, dtype=np.int32), plus=[seed])
    with pytest.raises(ValueError):
        expand(b"short", 3)


def test_encode_add_with_buffers_made_ahead_matches_the_allocating_path() -> None:
    from p2pfl.secure.masking import encode_buffers, fixed_point

    rng = np.random.default_rng(21)
    x = (rng.normal(0, 8, 1000)).astype(np.float32)
    x[:3] = (40.0, -40.0, 15.9999)  # clipped both ways, and near the bound
    codec = fixed_point(16.0, 4)
    mask = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    want = codec.encode_add(x, mask.copy())
    for block in (1, 7, 256, 1000, 4096):  # blocks that divide d, do not, or exceed it
        got = codec.encode_add(x, mask.copy(), encode_buffers(block))
        np.testing.assert_array_equal(got, want)
    nan = np.full(1000, np.nan, dtype=np.float32)
    untouched = mask.copy()
    with pytest.raises(ValueError):
        codec.encode_add(nan, untouched, encode_buffers(64))
    np.testing.assert_array_equal(untouched, mask)
    with pytest.raises(ValueError):
        codec.encode_add(x[:10], mask.copy(), encode_buffers(64))
