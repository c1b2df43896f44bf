"""Shamir secret sharing of 32-byte secrets over GF(2^127 - 1), with a checked reconstruction.

Why this shape:
- The prime 2^127 - 1 keeps every operation in plain Python integers (no dependency;
  the few PyPI packages are slow or unmaintained). A 32-byte secret does not fit one
  field element, so it is cut into three 15-byte chunks (120 bits < 127 bits), each
  shared with its own random polynomial; a share holds one value per chunk.
- Plain Shamir cannot tell a wrong answer from a right one: t-1 shares, or one altered
  share, interpolate to *some* secret. Every share therefore carries a commitment
  `SHA-256(domain || secret)`; reconstruction recomputes it and refuses a mismatch.
  For a uniformly random 32-byte secret (the only use here: seeds) the hash hides the
  secret and binds the dealer to it. When more than t shares are given, they must also
  lie on one polynomial of degree t-1 (a consistency check that names bad shares), and
  `reconstruct_robust` can still recover the secret around a few corrupted shares.
- Randomness comes only from `secrets`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**127 - 1
SECRET_LEN = 32
CHUNK_LEN = 15  # bytes per field element: 120 bits, strictly below the 127-bit prime
N_CHUNKS = -(-SECRET_LEN // CHUNK_LEN)  # 3
VALUE_LEN = 16  # each field element travels as 16 big-endian bytes
MAX_SHARES = 255  # share indices are 1..255 (one byte); index 0 would be the secret
SHARE_LEN = 2 + N_CHUNKS * VALUE_LEN + 32  # index, threshold, values, commitment
MAX_COMBINATIONS = 20_000  # bound on the subset search of reconstruct_robust
_COMMIT_DOMAIN = b"p2pfl/shamir/commitment/v1\x00"


class ShamirError(ValueError):
    """Reconstruction failed: too few shares, corrupted shares, or malformed input."""


@dataclass(frozen=True, slots=True)
class Share:
    """One holder's share: x = `index`, one y per chunk, plus the dealer's commitment."""

    index: int
    threshold: int
    values: tuple[int, ...]
    commitment: bytes

    def __post_init__(self) -> None:
        if not 1 <= self.index <= MAX_SHARES:
            raise ShamirError(f"share index {self.index} outside 1..{MAX_SHARES}")
        if not 2 <= self.threshold <= MAX_SHARES:
            raise ShamirError(f"threshold {self.threshold} outside 2..{MAX_SHARES}")
        if len(self.values) != N_CHUNKS or any(not 0 <= v < PRIME for v in self.values):
            raise ShamirError("share values must be N_CHUNKS field elements")
        if len(self.commitment) != 32:
            raise ShamirError("commitment must be 32 bytes")

    def to_bytes(self) -> bytes:
        """Fixed 82-byte layout: index | threshold | 3 x 16-byte values | commitment."""
        body = b"".join(v.to_bytes(VALUE_LEN, "big") for v in self.values)
        return bytes((self.index, self.threshold)) + body + self.commitment

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_LEN:
            raise ShamirError(f"a share is {SHARE_LEN} bytes, got {len(data)}")
        values = tuple(
            int.from_bytes(data[2 + i * VALUE_LEN : 2 + (i + 1) * VALUE_LEN], "big")
            for i in range(N_CHUNKS)
        )
        return cls(data[0], data[1], values, bytes(data[-32:]))


def commitment(secret: bytes) -> bytes:
    """The public check value every share carries."""
    return hashlib.sha256(_COMMIT_DOMAIN + secret).digest()


def split(secret: bytes, threshold: int, n_shares: int) -> list[Share]:
    """Cut `secret` into `n_shares` shares, any `threshold` of which rebuild it."""
    if len(secret) != SECRET_LEN:
        raise ValueError(f"secret must be {SECRET_LEN} bytes, got {len(secret)}")
    if not 2 <= threshold <= n_shares <= MAX_SHARES:
        raise ValueError(f"need 2 <= threshold ({threshold}) <= n ({n_shares}) <= {MAX_SHARES}")
    chunks = _to_chunks(secret)
    polys = [[c] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for c in chunks]
    commit = commitment(secret)
    return [
        Share(x, threshold, tuple(_evaluate(p, x) for p in polys), commit)
        for x in range(1, n_shares + 1)
    ]


def reconstruct(shares: Sequence[Share]) -> bytes:
    """The secret from at least `threshold` shares that all agree; ShamirError otherwise.

    All shares are used: with more than t of them, any share off the common polynomial
    is reported by index. The commitment catches what the polynomial cannot: too few
    shares (including a forged threshold) or t shares of which some were altered.
    """
    threshold, commit = _common(shares)
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares, got {len(shares)}")
    base, rest = shares[:threshold], shares[threshold:]
    bad = [s.index for s in rest if not _on_polynomial(base, s)]
    if bad:
        raise ShamirError(f"shares {bad} are inconsistent with the others (corrupted?)")
    secret = _interpolate_secret(base)
    if secret is None or not hmac.compare_digest(commitment(secret), commit):
        raise ShamirError("reconstructed secret does not match the commitment")
    return secret


def reconstruct_robust(shares: Sequence[Share]) -> tuple[bytes, tuple[int, ...]]:
    """Recover the secret despite corrupted shares: (secret, indices of bad shares).

    Tries t-subsets until one interpolates to the committed secret (bounded by
    MAX_COMBINATIONS). Needs at least t good shares. The commitment guarantees the
    secret; the bad indices (shares off that subset's polynomial) are a diagnosis,
    exact when the matching subset is all good, which is the common case.
    """
    threshold, commit = _common(shares)
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares, got {len(shares)}")
    for tried, subset in enumerate(itertools.combinations(shares, threshold)):
        if tried >= MAX_COMBINATIONS:
            break
        secret = _interpolate_secret(subset)
        if secret is not None and hmac.compare_digest(commitment(secret), commit):
            bad = tuple(s.index for s in shares if not _on_polynomial(subset, s))
            return secret, bad
    raise ShamirError("no subset of the shares matches the commitment")


# ------------------------------------------------------------------------ internals


def _to_chunks(secret: bytes) -> list[int]:
    return [
        int.from_bytes(secret[i : i + CHUNK_LEN], "big") for i in range(0, SECRET_LEN, CHUNK_LEN)
    ]


def _from_chunks(chunks: Sequence[int]) -> bytes | None:
    """Inverse of _to_chunks; None if an element cannot be a chunk (wrong interpolation)."""
    out = bytearray()
    for i, value in enumerate(chunks):
        size = min(CHUNK_LEN, SECRET_LEN - i * CHUNK_LEN)
        if value >= 1 << (8 * size):
            return None
        out += value.to_bytes(size, "big")
    return bytes(out)


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def _lagrange_at(points: Sequence[Share], x: int, chunk: int) -> int:
    """Value at `x` of the polynomial through `points` (chunk `chunk`)."""
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (x - pj.index) % PRIME
                den = den * (pi.index - pj.index) % PRIME
        total = (total + pi.values[chunk] * num * pow(den, -1, PRIME)) % PRIME
    return total


def _interpolate_secret(points: Sequence[Share]) -> bytes | None:
    return _from_chunks([_lagrange_at(points, 0, c) for c in range(N_CHUNKS)])


def _on_polynomial(points: Sequence[Share], share: Share) -> bool:
    return all(_lagrange_at(points, share.index, c) == share.values[c] for c in range(N_CHUNKS))


def _common(shares: Sequence[Share]) -> tuple[int, bytes]:
    if not shares:
        raise ShamirError("no shares")
    threshold, commit = shares[0].threshold, shares[0].commitment
    if any(s.threshold != threshold or s.commitment != commit for s in shares):
        raise ShamirError("shares come from different splits (threshold or commitment differ)")
    if len({s.index for s in shares}) != len(shares):
        raise ShamirError("duplicate share indices")
    return threshold, commit
