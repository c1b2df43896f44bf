"""Fixed-point encoding into Z_2^32 and pairwise masks that cancel in a group sum.

Encoding. A float32 update is clipped to [-R, R] and scaled to integers q with
|q| <= Q = floor(LIMIT / n), n the number of summands (members of the mask list) and
LIMIT = 2^30 - 1. Any sum of n such values lies in [-LIMIT, LIMIT], so the uint32 ring
sum read back as int32 is the exact integer sum: overflow is impossible by
construction, not by luck. The spare bit (LIMIT is 2^30, not 2^31) is a check: a
vector whose masks did not cancel (wrong key, missing or corrupted member) is uniform
on the ring, and each coordinate lands in the valid range with probability 1/2, so
`decode_mean` rejects it with probability 1 - 2^-d.
Scale s = Q / R (as float32, nudged down so fl(R * s) <= Q). Per coordinate, the
decoded mean differs from the mean of the clipped inputs by at most 0.5 / s plus float32
roundings (of x * s on the way in, of the mean on the way out): 0.5 / s + 2^-23 R.
With R = 16 and n = 5: s ~ 1.3e7, step 7.5e-8.
A Byzantine member can move its group's mean by at most about R: the decoded mean is
bounded by LIMIT / (s n) ~= R whatever it sends.

Masks. Members j, k of a group derive a 32-byte seed: X25519 of their round keys
(round_keys.py) -> HKDF-SHA256 with info binding the federation, round, leader, the
leader's session nonce, group, attempt (always 0: a v2 group has one), and both members
(ids and X25519 keys, in peer id order). The seed is an
AES-256-CTR key (zero nonce: every seed is used for one mask only) whose keystream,
read as little-endian uint32, is the mask: full 256-bit seeds, AES-NI speed (~8 GB/s
here on 4 MB, ChaCha20 ~5 GB/s; AES-128 would be ~15% faster and as sound with an
HKDF-derived key, but every member must expand alike and the tests pin AES-256),
generated in 256 KiB blocks that are added while in cache.
The member with the smaller peer id adds the mask, the other subtracts it, so a
complete group's masks cancel exactly in the ring sum. A member's own self-mask
(random seed, revealed only once the leader shows it holds the member's vector; see
group_member.py) is added on top.

Cost. Each stream is about one plain encode's time, so masking is ~(1 + g) x plain
fixed point in CPU. The whole mask does not depend on the update: `member_mask`
computes it ahead (once the mask list is known, while the update is still training)
and `FixedPoint.encode_add` then masks with one encode and one add pass, ~1.25x plain.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LIMIT = 2**30 - 1
"""Bound on |group sum| in ring units; one spare bit below int32 detects bad sums."""
MIN_CLIP = 1e-6  # keeps the scale a finite float32 (a peer-chosen clip must not hang us)
MAX_CLIP = 1e6
SEED_LEN = 32
BLOCK_WORDS = 1 << 16  # 256 KiB of keystream per step
_ZERO_NONCE = bytes(16)
_ZEROS = bytes(4 * BLOCK_WORDS)
_PAIR_DOMAIN = b"p2pfl/secure/pair-mask/v1\x00"


class SumRejected(ValueError):
    """A group sum is outside the range honest encodings can produce."""


# --------------------------------------------------------------------- fixed point


class _Scratch:
    """Per-call keystream block buffer (allocated once per vector, not per block)."""

    __slots__ = ("keystream",)

    def __init__(self, words: int) -> None:
        # update_into wants block_size - 1 spare bytes after the output.
        self.keystream = bytearray(4 * max(words, 1) + 15)


def _as_update(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D update, got shape {x.shape}")
    return x


def _check_acc(acc: np.ndarray) -> None:
    if acc.dtype != np.uint32 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError("acc must be a contiguous 1-D uint32 array")
    if not acc.flags.writeable:
        raise ValueError("acc must be writeable")


@dataclass(frozen=True, slots=True)
class FixedPoint:
    """Encoding of float32 vectors for a sum of at most `summands` terms."""

    clip: float
    summands: int
    scale: float = field(init=False)
    bound: int = field(init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and MIN_CLIP <= self.clip <= MAX_CLIP):
            raise ValueError(f"clip must be in [{MIN_CLIP}, {MAX_CLIP}], got {self.clip}")
        if not 1 <= self.summands <= 1024:
            raise ValueError(f"summands must be in 1..1024, got {self.summands}")
        bound = LIMIT // self.summands
        clip32 = np.float32(self.clip)
        scale = np.float32(bound / float(clip32))
        # float32 rounding is monotone, so fl(x * s) <= fl(R * s) <= bound for |x| <= R.
        for _ in range(16):  # one or two steps in practice
            if float(clip32 * scale) <= bound:
                break
            scale = np.nextafter(scale, np.float32(0))
        else:
            raise ValueError(f"no float32 scale for clip {self.clip}, summands {self.summands}")
        object.__setattr__(self, "bound", bound)
        object.__setattr__(self, "scale", float(scale))

    @property
    def step(self) -> float:
        """Quantization step in update units; rounding error is at most half of it."""
        return 1.0 / self.scale

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 (d,) -> uint32 (d,): clip, scale, round to nearest (no randomness).

        Non-finite input is refused: NaN has no integer image, and an honest node never
        sends one. Whole-array numpy passes: measured faster here than a cache-blocked
        version (the per-block call overhead outweighs the cache misses, even at d = 1e6).
        """
        x = _as_update(x)
        if not np.isfinite(x).all():
            raise ValueError("update contains NaN or infinity")
        clip = np.float32(self.clip)
        y: np.ndarray = np.clip(x, -clip, clip)
        y *= np.float32(self.scale)
        np.rint(y, out=y)
        out: np.ndarray = y.astype(np.int32).view(np.uint32)
        return out

    def encode_add(
        self, x: np.ndarray, acc: np.ndarray, work: EncodeBuffers | None = None
    ) -> np.ndarray:
        """acc += encode(x) mod 2^32, in place: puts an update into a precomputed mask.

        What remains on a member's critical path once its mask was computed ahead
        (`member_mask`). With `work` (made ahead by `encode_buffers`) it runs in blocks
        that stay in cache and allocates nothing: measured at d = 1e6 with cold arrays,
        as fast as a plain `encode`, where whole-array passes took 1.3x. `acc` is
        untouched on error.
        """
        _check_acc(acc)
        x = _as_update(x)
        if x.size != acc.size:
            raise ValueError(f"acc has {acc.size} words, the update {x.size}")
        if not np.isfinite(x).all():
            raise ValueError("update contains NaN or infinity")
        if work is None:
            np.add(acc, self.encode(x), out=acc)
            return acc
        clip, scale, block = np.float32(self.clip), np.float32(self.scale), work.real.size
        for start in range(0, x.size, block):
            n = min(block, x.size - start)
            real, whole, out = work.real[:n], work.whole[:n], acc[start : start + n]
            np.clip(x[start : start + n], -clip, clip, out=real)
            np.multiply(real, scale, out=real)
            np.rint(real, out=real)
            np.copyto(whole, real, casting="unsafe")  # exact: |q| <= 2^30
            np.add(out, whole.view(np.uint32), out=out)
        return acc

    def decode_mean(self, total: np.ndarray, count: int) -> np.ndarray:
        """uint32 ring sum of `count` encodings -> float32 mean; SumRejected if impossible."""
        if not 1 <= count <= self.summands:
            raise ValueError(f"count {count} outside 1..{self.summands}")
        signed = np.ascontiguousarray(total, dtype=np.uint32).view(np.int32)
        if signed.size and (int(signed.min()) < -LIMIT or int(signed.max()) > LIMIT):
            raise SumRejected("group sum out of range: masks did not cancel or a vector is bad")
        out = np.empty(signed.shape, dtype=np.float32)
        # One buffered pass: int32 * float64 computed in float64, rounded once to float32.
        np.multiply(signed, np.float64(1.0 / (self.scale * count)), out=out, casting="unsafe")
        return out


ENCODE_BLOCK = 1 << 17  # words per block of `encode_add`: 2 x 512 KiB of scratch


@dataclass(frozen=True, slots=True, eq=False)
class EncodeBuffers:
    """Scratch for `FixedPoint.encode_add`, made (and its pages touched) ahead."""

    real: np.ndarray  # float32
    whole: np.ndarray  # int32


def encode_buffers(block: int = ENCODE_BLOCK) -> EncodeBuffers:
    """Written once here, so their pages are faulted in now, not on the critical path
    (np.zeros would map zero pages lazily)."""
    return EncodeBuffers(np.full(block, 1.0, dtype=np.float32), np.full(block, 1, dtype=np.int32))


@lru_cache(maxsize=64)
def fixed_point(clip: float, summands: int) -> FixedPoint:
    return FixedPoint(clip, summands)


# -------------------------------------------------------------------- pair seeds


@dataclass(frozen=True, slots=True)
class MaskContext:
    """Everything a pair seed is bound to besides the two members."""

    federation: str
    round: int
    aggregator: str
    session: bytes
    group: int
    attempt: int

    def info(self, id_a: str, key_a: bytes, id_b: str, key_b: bytes) -> bytes:
        """HKDF info: length-prefixed fields, members in peer id order (both sides agree)."""
        (lo_id, lo_key), (hi_id, hi_key) = sorted(((id_a, key_a), (id_b, key_b)))
        parts = (
            self.federation.encode(),
            self.aggregator.encode(),
            self.session,
            lo_id.encode(),
            lo_key,
            hi_id.encode(),
            hi_key,
        )
        fixed = struct.pack(">QII", self.round, self.group, self.attempt)
        return _PAIR_DOMAIN + fixed + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def derive_seed(shared_secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SEED_LEN, salt=None, info=info).derive(
        shared_secret
    )


# ------------------------------------------------------------------ mask streams


def _keystream_cipher(seed: bytes) -> Cipher[modes.CTR]:
    if len(seed) != SEED_LEN:
        raise ValueError(f"a mask seed is {SEED_LEN} bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE))


def expand(seed: bytes, d: int) -> np.ndarray:
    """The full mask of one seed: d uint32 words of AES-256-CTR keystream."""
    return mask_sum(d, plus=(seed,))


def _encryptors(plus: Iterable[bytes], minus: Iterable[bytes]) -> list[tuple[CipherContext, bool]]:
    streams = [(_keystream_cipher(s).encryptor(), True) for s in plus]
    return streams + [(_keystream_cipher(s).encryptor(), False) for s in minus]


def _apply_block(
    part: np.ndarray, streams: list[tuple[CipherContext, bool]], scratch: _Scratch
) -> None:
    """part += / -= the next len(part) words of every stream, while `part` is in cache."""
    n = part.size
    zeros = memoryview(_ZEROS)[: 4 * n]
    for encryptor, positive in streams:
        encryptor.update_into(zeros, scratch.keystream)
        ks = np.frombuffer(scratch.keystream, dtype="<u4", count=n)
        if positive:
            np.add(part, ks, out=part)
        else:
            np.subtract(part, ks, out=part)


def add_streams(
    acc: np.ndarray, plus: Iterable[bytes] = (), minus: Iterable[bytes] = ()
) -> np.ndarray:
    """acc += sum(mask(s) for s in plus) - sum(mask(s) for s in minus), mod 2^32, in place.

    Block by block, every stream's next block is written into one reusable buffer and
    added while it is still in cache: one pass over `acc` per stream, no d-sized
    temporaries. The loop is over blocks and streams, never over coordinates.
    """
    _check_acc(acc)
    streams = _encryptors(plus, minus)
    if not streams:
        return acc
    d = acc.size
    scratch = _Scratch(min(d, BLOCK_WORDS))
    for start in range(0, d, BLOCK_WORDS):
        _apply_block(acc[start : start + BLOCK_WORDS], streams, scratch)
    return acc


def mask_sum(d: int, plus: Sequence[bytes] = (), minus: Sequence[bytes] = ()) -> np.ndarray:
    """sum(mask(s) for s in plus) - sum(mask(s) for s in minus), a new (d,) uint32 array.

    The first positive stream is written straight into the result (AES-CTR into the
    array's own bytes) instead of added to zeros: one memory pass fewer. The array has
    4 spare words behind the returned view because `update_into` wants block_size - 1
    bytes of room after its output.
    """
    if d < 0:
        raise ValueError("negative length")
    if not plus:
        return add_streams(np.zeros(d, dtype=np.uint32), minus=minus)
    store = np.empty(d + 4, dtype=np.uint32)
    out = store[:d]
    raw = store.data.cast("B")
    first = _keystream_cipher(plus[0]).encryptor()
    rest = _encryptors(plus[1:], minus)
    scratch = _Scratch(min(d, BLOCK_WORDS))
    for start in range(0, d, BLOCK_WORDS):
        n = min(BLOCK_WORDS, d - start)
        # Writes 4n bytes; the following 15 bytes of room belong to the next block (or
        # the spare words), which is written afterwards.
        first.update_into(memoryview(_ZEROS)[: 4 * n], raw[4 * start : 4 * (start + n) + 16])
        if rest:
            _apply_block(out[start : start + n], rest, scratch)
    return out


def mask_signs(me: str, members: Sequence[str]) -> tuple[list[str], list[str]]:
    """(peers whose pair mask `me` adds, peers whose pair mask it subtracts)."""
    plus = [p for p in members if p > me]
    minus = [p for p in members if p < me]
    return plus, minus


def mask_encoded(
    encoded: np.ndarray,
    me: str,
    pair_seeds: dict[str, bytes],
    self_seed: bytes | None = None,
    *,
    copy: bool = True,
) -> np.ndarray:
    """encoded + self mask + sum_{k > me} m_k - sum_{k < me} m_k, mod 2^32.

    A new array, or `encoded` itself masked in place with copy=False (saves a d-sized
    copy when the encoding is a temporary, as in the member's send path).
    """
    plus, minus = member_streams(me, pair_seeds, self_seed)
    out = np.array(encoded, dtype=np.uint32, copy=True) if copy else encoded
    return add_streams(out, plus=plus, minus=minus)


def member_streams(
    me: str, pair_seeds: dict[str, bytes], self_seed: bytes | None = None
) -> tuple[list[bytes], list[bytes]]:
    """(seeds whose masks `me` adds, seeds it subtracts): pair masks by id order + self."""
    plus, minus = mask_signs(me, sorted(pair_seeds))
    plus_seeds = [pair_seeds[p] for p in plus]
    if self_seed is not None:
        plus_seeds.append(self_seed)
    return plus_seeds, [pair_seeds[p] for p in minus]


def member_mask(
    d: int, me: str, pair_seeds: dict[str, bytes], self_seed: bytes | None = None
) -> np.ndarray:
    """The whole mask a member adds to its encoding (it does not depend on the update).

    Computed ahead, as soon as the group is known, `codec.encode_add(update, mask)`
    then masks the update with a single pass.
    """
    plus, minus = member_streams(me, pair_seeds, self_seed)
    return mask_sum(d, plus, minus)
