"""Shamir sharing over 2^127 - 1: exact reconstruction, and refusal of wrong answers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.secure.shamir import (
    PRIME,
    SHARE_LEN,
    ShamirError,
    Share,
    reconstruct,
    reconstruct_robust,
    split,
)


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    threshold=st.integers(2, 6),
    extra=st.integers(0, 3),
    data=st.data(),
)
def test_any_threshold_subset_rebuilds_the_secret(
    secret: bytes, threshold: int, extra: int, data: st.DataObject
) -> None:
    shares = split(secret, threshold, threshold + extra)
    subset = data.draw(st.permutations(shares)).copy()[:threshold]
    assert reconstruct(subset) == secret
    assert reconstruct(shares) == secret  # all of them, consistency-checked


def test_extreme_secrets_survive_chunking() -> None:
    for secret in (bytes(32), b"\xff" * 32, bytes(range(32))):
        assert reconstruct(split(secret, 3, 5)[1:4]) == secret


def test_too_few_shares_is_detected_even_with_a_forged_threshold() -> None:
    secret = bytes(range(32))
    shares = split(secret, 4, 6)
    with pytest.raises(ShamirError, match="need 4 shares"):
        reconstruct(shares[:3])
    # Lying about the threshold makes t-1 shares interpolate to some other "secret":
    # only the commitment can tell, and it does.
    forged = [Share(s.index, 3, s.values, s.commitment) for s in shares[:3]]
    with pytest.raises(ShamirError, match="commitment"):
        reconstruct(forged)


def test_a_corrupted_share_is_detected_and_recovered_around() -> None:
    secret = b"\x42" * 32
    shares = split(secret, 3, 5)
    bad = Share(shares[1].index, 3, ((shares[1].values[0] + 1) % PRIME, *shares[1].values[1:]),
                shares[1].commitment)  # fmt: skip
    # Exactly t shares, one altered: the polynomial cannot tell, the commitment does.
    with pytest.raises(ShamirError, match="commitment"):
        reconstruct([shares[0], bad, shares[2]])
    # More than t: the odd one out is named.
    tampered = [shares[0], bad, *shares[2:]]
    with pytest.raises(ShamirError, match="inconsistent"):
        reconstruct([shares[0], shares[2], shares[3], bad])
    assert reconstruct_robust(tampered) == (secret, (bad.index,))
    # Too many bad shares: no subset matches, and nothing wrong is returned.
    # (Distinct offsets: equal offsets on some points can cancel in the interpolation
    # at 0 and still give the true secret, which the commitment would then accept.)
    worse = [
        Share(s.index, 3, ((s.values[0] + 7 * s.index**3) % PRIME, *s.values[1:]), s.commitment)
        for s in shares[:3]
    ]
    with pytest.raises(ShamirError):
        reconstruct_robust([*worse, shares[3]])


def test_shares_of_different_splits_do_not_mix() -> None:
    a, b = split(bytes(32), 2, 3), split(b"\x01" * 32, 2, 3)
    with pytest.raises(ShamirError, match="different splits"):
        reconstruct([a[0], b[1]])
    with pytest.raises(ShamirError, match="duplicate"):
        reconstruct([a[0], a[0]])


def test_share_bytes_round_trip_and_validation() -> None:
    shares = split(bytes(range(32)), 3, 4)
    for s in shares:
        data = s.to_bytes()
        assert len(data) == SHARE_LEN
        assert Share.from_bytes(data) == s
    data = bytearray(shares[0].to_bytes())
    with pytest.raises(ShamirError):
        Share.from_bytes(bytes(data[:-1]))
    data[0] = 0  # index 0 would be the secret itself
    with pytest.raises(ShamirError):
        Share.from_bytes(bytes(data))
    data = bytearray(shares[0].to_bytes())
    data[2:18] = (2**128 - 1).to_bytes(16, "big")  # not a field element
    with pytest.raises(ShamirError):
        Share.from_bytes(bytes(data))


def test_split_is_randomized_and_validates_arguments() -> None:
    secret = bytes(32)
    one, two = split(secret, 2, 3), split(secret, 2, 3)
    assert one[0].values != two[0].values  # fresh coefficients every time
    # Any single share of a 2-of-n split differs across splits of the same secret,
    # and pairs across splits never combine to the secret.
    for x, y in itertools.product(one[:1], two[1:2]):
        with pytest.raises(ShamirError):
            reconstruct([x, y])
    for args in ((secret, 1, 3), (secret, 4, 3), (secret, 2, 256), (b"short", 2, 3)):
        with pytest.raises(ValueError):
            split(*args)  # type: ignore[arg-type]
