"""Compression: pipeline syntax, exactness and error bounds, error feedback, keyframes and
missing bases, hostile blobs (typed errors only, no bombs), state, and a 5-node gossip run."""

from __future__ import annotations

import copy
import math
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.compression import UpdateDecoder, UpdateEncoder, parse_pipeline
from p2pfl.compression.decoder import REASONS
from p2pfl.compression.frame import (
    DELTA,
    QUANT_SHIFT,
    SPARSE,
    ZSTD,
    body_size,
    parse_header,
    read_body,
)
from p2pfl.compression.pipeline import QUANT_BLOCK, Quantize, TopK
from p2pfl.compression.quantize import decode_values, encode_values
from p2pfl.compression.sparse import decode_indices, encode_indices, index_size, top_k
from p2pfl.wire import WireError
from p2pfl.wire.codec import MAX_BLOB_KEYS, decode, encode
from p2pfl.wire.messages import CompressedModelUpdate
from p2pfl.wire.tensors import decode_tensor, encode_tensor

PROPS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=250, suppress_health_check=[HealthCheck.too_slow])
LIMIT = 1 << 20
STRONG = ["delta", "topk:0.01", "quantize:8", "zstd:3"]
PIPELINES = [
    [],
    ["zstd:3"],
    ["quantize:16"],
    ["quantize:8"],
    ["quantize:4s", "zstd:1"],
    ["delta"],
    ["delta", "zstd:3"],
    ["delta", "quantize:8"],
    ["delta", "topk:0.1"],
    ["delta", "topk:0.05", "quantize:4"],
    ["delta", "topk:0.01:noef", "quantize:8s"],
    STRONG,
]
LOSSLESS = [p for p in PIPELINES if parse_pipeline(p).lossless]

finite32 = st.floats(-1e6, 1e6, width=32, allow_subnormal=False)
vectors = hnp.arrays(np.float32, st.integers(1, 700), elements=finite32)


def f32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def walk(d: int, rounds: int, seed: int = 0, step: float = 0.05) -> list[np.ndarray]:
    """A model drifting like training does: a start plus small random changes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, d).astype(np.float32)
    out = []
    for _ in range(rounds):
        x = x + f32(rng.normal(0.0, step, d))
        out.append(x)
    return out


def sent_vector(blob: dict[str, Any], dim: int) -> np.ndarray:
    """What one message adds to x_hat (a keyframe: the whole model), decoded independently."""
    header = parse_header(blob, dim=dim, round=10**9)
    idx, values = read_body(header, dim=dim, limit=LIMIT)
    out = np.zeros(dim, dtype=np.float64)
    if idx is None:
        out[:] = values
    else:
        out[idx] = values
    return out


# ---------------------------------------------------------------- pipeline syntax


@pytest.mark.parametrize("stages", PIPELINES, ids=str)
def test_canonical_stages_parse_back_to_the_same_pipeline(stages: list[str]) -> None:
    pipeline = parse_pipeline(stages)
    assert list(pipeline.stages) == stages
    assert parse_pipeline(pipeline.stages) == pipeline


@pytest.mark.parametrize(
    ("stages", "needle"),
    [
        (["delta", "topk:0"], "'topk:0'"),
        (["delta", "topk:1.5"], "'topk:1.5'"),
        (["delta", "topk:nan"], "'topk:nan'"),
        (["delta", "topk:x"], "'topk:x'"),
        (["delta", "topk:0.1:ef"], "'topk:0.1:ef'"),
        (["topk:0.1"], "needs 'delta'"),
        (["quantize:2"], "'quantize:2'"),
        (["quantize:16s"], "'quantize:16s'"),
        (["zstd:0"], "'zstd:0'"),
        (["zstd:23"], "'zstd:23'"),
        (["zstd:-1"], "'zstd:-1'"),
        (["gzip:3"], "'gzip:3'"),
        (["delta:1"], "'delta:1'"),
        (["zstd:3", "quantize:8"], "'quantize:8'"),
        (["quantize:8", "quantize:16"], "appears twice"),
        (["quantize:8", "delta"], "'delta'"),
    ],
)
def test_bad_stages_are_named(stages: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        parse_pipeline(stages)


def test_a_plain_string_is_not_a_pipeline() -> None:
    with pytest.raises(ValueError, match="list of stage strings"):
        parse_pipeline("zstd:3")


# ---------------------------------------------------------------- building blocks


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    dim = draw(st.integers(1, 2**20))
    values = draw(st.lists(st.integers(0, dim - 1), unique=True, min_size=1, max_size=300))
    return np.array(sorted(values), dtype=np.int64), dim


@PROPS
@given(index_sets())
def test_index_encoding_round_trips_at_its_announced_size(case: tuple[np.ndarray, int]) -> None:
    idx, dim = case
    data = encode_indices(idx, dim)
    assert len(data) == index_size(idx.size, dim)
    np.testing.assert_array_equal(decode_indices(data, idx.size, dim), idx)
    # Elias-Fano: at most 2 + log2(dim / k) bits per index, plus the last byte's padding
    assert 8 * len(data) <= idx.size * (2 + max(0.0, math.log2(dim / idx.size))) + 8


def test_index_code_is_smaller_than_whole_byte_gaps() -> None:
    """The sizes the issue-15 measurement is about: top-5% of the 2410-parameter MLP
    (gaps fit one byte: 121 bytes) and top-1% of a million (gaps need two: 20 kB)."""
    assert index_size(121, 2410) == 95
    assert index_size(10_000, 10**6) == 10_703


def _bits(text: str) -> bytes:
    """Bytes from a bit string; spaces separate the parts of a code for the reader."""
    text = text.replace(" ", "")
    return int(text, 2).to_bytes(len(text) // 8, "big")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        # dim 9, two indices: l = 2 low bits each, then a 4-bit bitmap (one byte)
        (_bits("11 01 1001"), "out of range"),  # indices 3 and 9
        (_bits("11 10 1100"), "strictly increasing"),  # indices 3 and 2
        (_bits("01 01 1100"), "strictly increasing"),  # indices 1 and 1
        (_bits("11 01 1000"), "set bits"),
        (_bits("11 01 1110"), "set bits"),
    ],
)
def test_bad_index_codes_are_refused(data: bytes, needle: str) -> None:
    assert decode_indices(_bits("11 01 1010"), 2, 9).tolist() == [3, 5]
    with pytest.raises(WireError, match=needle) as info:
        decode_indices(data, 2, 9)
    assert info.value.reason == "bad_compression"


def test_index_padding_bits_must_be_zero() -> None:
    data = encode_indices(np.array([0, 7, 11], dtype=np.int64), 12)  # 3 * 2 + 5 = 11 bits
    assert len(data) == index_size(3, 12) == 2
    assert decode_indices(data, 3, 12).tolist() == [0, 7, 11]
    with pytest.raises(WireError, match="padding"):
        decode_indices(data[:1] + bytes([data[1] | 1]), 3, 12)


@FUZZ
@given(st.integers(1, 3000), st.data())
def test_fuzz_index_codes(dim: int, data: st.DataObject) -> None:
    """Any bytes of the announced size: only bad_compression, or indices that are
    strictly increasing, in range, and whose encoding is exactly these bytes."""
    count = data.draw(st.integers(1, min(dim, 200)))
    raw = data.draw(st.binary(min_size=index_size(count, dim), max_size=index_size(count, dim)))
    try:
        idx = decode_indices(raw, count, dim)
    except WireError as exc:
        assert exc.reason == "bad_compression"
        return
    assert idx.size == count and idx[0] >= 0 and idx[-1] < dim
    assert (np.diff(idx) > 0).all()
    assert encode_indices(idx, dim) == raw


@PROPS
@given(vectors, st.floats(0.001, 1.0))
def test_top_k_keeps_exactly_the_largest_magnitudes(u: np.ndarray, fraction: float) -> None:
    k = TopK(fraction).count(u.size)
    idx = top_k(u, k)
    assert idx.size == k and np.all(np.diff(idx) > 0)
    rest = np.delete(np.abs(u), idx)
    assert rest.size == 0 or np.abs(u[idx]).min() >= rest.max()


def test_top_k_ties_are_broken_by_position() -> None:
    u = np.zeros(100, dtype=np.float32)
    u[[5, 7]] = [1.0, -2.0]
    np.testing.assert_array_equal(top_k(u, 5), [0, 1, 2, 5, 7])


@PROPS
@given(vectors, st.sampled_from([8, 4]), st.booleans())
def test_int_quantization_error_is_within_the_block_scale(
    v: np.ndarray, bits: int, stochastic: bool
) -> None:
    quant = Quantize(bits, stochastic)
    data, sent = encode_values(v, quant, np.random.default_rng(0))
    got = decode_values(memoryview(data), v.size, quant)
    np.testing.assert_array_equal(got, sent)  # the receiver decodes what the sender counted
    pad = -v.size % QUANT_BLOCK
    blocks = np.abs(np.r_[v, np.zeros(pad, np.float32)]).reshape(-1, QUANT_BLOCK)
    scale = np.repeat(blocks.max(axis=1) / quant.levels, QUANT_BLOCK)[: v.size]
    bound = scale * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-30
    assert np.all(np.abs(got.astype(np.float64) - v) <= bound)


@PROPS
@given(vectors)
def test_float16_error_is_relative(v: np.ndarray) -> None:
    quant = Quantize(16)
    data, sent = encode_values(v, quant, np.random.default_rng(0))
    assert len(data) == 2 * v.size
    got = decode_values(memoryview(data), v.size, quant)
    np.testing.assert_array_equal(got, sent)
    clipped = np.clip(v, -65504, 65504).astype(np.float64)
    assert np.all(np.abs(got - clipped) <= np.abs(clipped) * 2.0**-11 + 2.0**-25)


def test_stochastic_rounding_is_unbiased() -> None:
    v = np.full(QUANT_BLOCK, 0.3, dtype=np.float32)
    v[0] = 1.0  # sets the scale: int4 levels are multiples of 1/7
    quant = Quantize(4, stochastic=True)
    rng = np.random.default_rng(1)
    mean = np.mean([encode_values(v, quant, rng)[1][1:].mean() for _ in range(200)])
    nearest = encode_values(v, Quantize(4), rng)[1][1]
    assert abs(mean - 0.3) < 0.005 < abs(nearest - 0.3)


# ---------------------------------------------------------------- encoder <-> decoder


@PROPS
@given(st.sampled_from(LOSSLESS), st.integers(1, 400), st.integers(0, 2**16))
def test_lossless_pipelines_round_trip_exactly(stages: list[str], d: int, seed: int) -> None:
    enc = UpdateEncoder(parse_pipeline(stages), keyframe_every=4)
    dec = UpdateDecoder(d, max_frame_size=LIMIT)
    for r, x in enumerate(walk(d, 7, seed)):
        got = dec.decode("s", r, enc.encode(x, r))
        np.testing.assert_array_equal(got, x)
        assert got.dtype == np.float32 and got.shape == (d,)


@PROPS
@given(st.sampled_from(PIPELINES), st.integers(1, 600), st.integers(0, 2**16))
def test_receiver_copy_equals_sender_copy_bit_for_bit(stages: list[str], d: int, seed: int) -> None:
    enc = UpdateEncoder(parse_pipeline(stages), keyframe_every=5, seed=seed)
    dec = UpdateDecoder(d, max_frame_size=LIMIT)
    for r, x in enumerate(walk(d, 8, seed)):
        blob = enc.encode(x, r)
        # Through the real wire codec, as the node sends it.
        msg = decode(encode(CompressedModelUpdate("s", r, blob, 10)))
        assert isinstance(msg, CompressedModelUpdate)
        got = dec.decode("s", r, msg.blob)
        assert enc.x_hat is not None
        np.testing.assert_array_equal(got, enc.x_hat)
        assert enc.raw_bytes == 4 * d
        assert enc.wire_bytes == len(msgpack.packb(blob, use_bin_type=True))


@pytest.mark.parametrize(
    ("stages", "bound"),
    [(["quantize:16"], 1e-3), (["quantize:8"], 0.02), (["quantize:4"], 0.3)],
)
def test_lossy_keyframes_stay_close(stages: list[str], bound: float) -> None:
    enc = UpdateEncoder(parse_pipeline(stages))
    dec = UpdateDecoder(1000, max_frame_size=LIMIT)
    x = walk(1000, 1)[0]
    got = dec.decode("s", 0, enc.encode(x, 0))
    err = np.abs(got - x).max() / np.abs(x).max()
    assert 0 < err < bound


def test_strong_pipeline_is_small() -> None:
    d = 5000
    enc = UpdateEncoder(parse_pipeline(STRONG), keyframe_every=0)
    xs = walk(d, 3)
    enc.encode(xs[0], 0)
    enc.encode(xs[1], 1)
    assert enc.raw_bytes / enc.wire_bytes > 50  # 50 values of 5000: int8 + ~1.5 index bytes


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("stages", [p for p in PIPELINES if "delta" in p], ids=str)
def test_sent_plus_residual_equals_sum_of_true_updates(stages: list[str]) -> None:
    d = 300
    enc = UpdateEncoder(parse_pipeline(stages), keyframe_every=0, seed=3)
    sent = np.zeros(d)
    previous = np.zeros(d, dtype=np.float32)
    true = np.zeros(d)
    for r, x in enumerate(walk(d, 20)):
        sent += sent_vector(enc.encode(x, r), d)
        true += x.astype(np.float64) - previous
        previous = x
    residual = enc.residual
    assert residual is not None
    np.testing.assert_allclose(sent + residual, true, atol=1e-4)
    assert enc.x_hat is not None
    np.testing.assert_allclose(sent, enc.x_hat, atol=1e-4)


def test_error_feedback_delivers_what_top_k_dropped() -> None:
    """Once the model stops changing, EF keeps sending the backlog; without EF it is lost."""
    d = 400
    xs = walk(d, 5, step=0.5)
    final = {}
    for stages in (["delta", "topk:0.1"], ["delta", "topk:0.1:noef"]):
        enc = UpdateEncoder(parse_pipeline(stages), keyframe_every=0)
        for r in range(40):
            enc.encode(xs[min(r, 4)], r)
        residual = enc.residual
        assert residual is not None
        final[stages[1]] = float(np.abs(residual).max())
    assert final["topk:0.1"] == 0.0  # all 400 coordinates sent within 10 quiet rounds
    assert final["topk:0.1:noef"] > 0.3  # the dropped parts of the 4 real changes stay lost


# ---------------------------------------------------------------- keyframes and bases


def test_keyframe_schedule_and_force() -> None:
    enc = UpdateEncoder(parse_pipeline(STRONG), keyframe_every=3)
    xs = walk(50, 10)
    bases = [enc.encode(xs[r], r)["b"] for r in range(7)]
    assert bases == [-1, 0, 1, -1, 3, 4, -1]
    enc.force_keyframe()
    blob = enc.encode(xs[7], 7)
    # a keyframe: no delta, no top-k, int8 (zstd only if it made the body smaller)
    assert blob["b"] == -1 and blob["f"] & ~ZSTD == 2 << QUANT_SHIFT
    assert enc.encode(xs[8], 8)["f"] & ~ZSTD == DELTA | SPARSE | 2 << QUANT_SHIFT


def test_without_delta_every_message_is_a_keyframe() -> None:
    enc = UpdateEncoder(parse_pipeline(["quantize:8"]), keyframe_every=0)
    assert all(enc.encode(x, r)["b"] == -1 for r, x in enumerate(walk(20, 4)))


def test_rounds_must_increase() -> None:
    enc = UpdateEncoder(parse_pipeline(["delta"]))
    x = walk(5, 1)[0]
    enc.encode(x, 3)
    with pytest.raises(ValueError, match="not after"):
        enc.encode(x, 3)


def test_missing_base_until_the_next_keyframe() -> None:
    d = 64
    enc = UpdateEncoder(parse_pipeline(["delta", "topk:0.25", "quantize:8"]), keyframe_every=4)
    dec = UpdateDecoder(d, max_frame_size=LIMIT)
    blobs = [enc.encode(x, r) for r, x in enumerate(walk(d, 9))]
    dec.decode("s", 0, blobs[0])
    before = dec.decode("s", 1, blobs[1])
    assert before.flags.writeable is False
    # round 2 is lost: 3 cannot be applied (its base is missing), and neither can a
    # replay of 1 (a late duplicate of what we have: stale, nothing is missing)
    for r, reason in ((3, "missing_base"), (1, "stale")):
        with pytest.raises(WireError) as info:
            dec.decode("s", r, blobs[r])
        assert info.value.reason == reason
    assert dec.round_of("s") == 1
    assert blobs[4]["b"] == -1  # the keyframe resynchronizes
    for r in (4, 5, 6):
        dec.decode("s", r, blobs[r])
    # a new receiver joins mid-stream: nothing until the next keyframe (round 8)
    late = UpdateDecoder(d, max_frame_size=LIMIT)
    with pytest.raises(WireError, match="no copy") as info:
        late.decode("s", 7, blobs[7])
    assert info.value.reason == "missing_base"
    dec.decode("s", 7, blobs[7])
    assert blobs[8]["b"] == -1
    np.testing.assert_array_equal(late.decode("s", 8, blobs[8]), enc.x_hat)
    np.testing.assert_array_equal(dec.decode("s", 8, blobs[8]), enc.x_hat)


def test_forget_drops_the_copy() -> None:
    enc = UpdateEncoder(parse_pipeline(["delta"]))
    dec = UpdateDecoder(4, max_frame_size=LIMIT)
    xs = walk(4, 2)
    dec.decode("s", 0, enc.encode(xs[0], 0))
    dec.forget("s")
    dec.forget("never-seen")
    with pytest.raises(WireError, match="missing_base"):
        dec.decode("s", 1, enc.encode(xs[1], 1))


def test_copies_are_per_sender() -> None:
    dec = UpdateDecoder(8, max_frame_size=LIMIT)
    a, b = (UpdateEncoder(parse_pipeline(["delta", "quantize:8"])) for _ in range(2))
    xa, xb = walk(8, 2, seed=1), walk(8, 2, seed=2)
    for r in range(2):
        got_a = dec.decode("a", r, a.encode(xa[r], r))
        got_b = dec.decode("b", r, b.encode(xb[r], r))
    np.testing.assert_array_equal(got_a, a.x_hat)
    np.testing.assert_array_equal(got_b, b.x_hat)


# ---------------------------------------------------------------- checkpoint state


def test_state_survives_a_checkpoint_and_continues_the_stream() -> None:
    d = 100
    pipeline = parse_pipeline(STRONG)
    enc = UpdateEncoder(pipeline, keyframe_every=0)
    dec = UpdateDecoder(d, max_frame_size=LIMIT)
    xs = walk(d, 6)
    for r in range(3):
        dec.decode("s", r, enc.encode(xs[r], r))
    # the checkpoint stores tensors with the wire tensor codec
    stored = {k: decode_tensor(encode_tensor(v)) for k, v in enc.state().items()}
    restored = UpdateEncoder(pipeline, keyframe_every=0)
    restored.load_state(stored)
    for r in range(3, 6):
        blob = restored.encode(xs[r], r)
        assert blob == enc.encode(xs[r], r)  # the restored encoder continues identically
        np.testing.assert_array_equal(dec.decode("s", r, blob), restored.x_hat)


def test_empty_state_and_bad_states() -> None:
    enc = UpdateEncoder(parse_pipeline(["delta"]))
    assert enc.state() == {}
    enc.encode(walk(3, 1)[0], 0)
    good = enc.state()
    assert set(good) == {"x_hat", "residual", "rounds"}
    bad_states: list[dict[str, np.ndarray]] = [
        {"x_hat": good["x_hat"]},
        {**good, "x_hat": good["x_hat"].astype(np.float64)},
        {**good, "residual": np.zeros(4, np.float32)},
        {**good, "x_hat": f32([np.nan, 0, 0])},
        {**good, "rounds": np.array([1, 2], np.int32)},
        {**good, "rounds": np.array([1.0, 0.0])},
    ]
    for state in bad_states:
        with pytest.raises(ValueError):
            enc.load_state(state)
    enc.load_state({})
    assert enc.state() == {}


# ---------------------------------------------------------------- hostile input


def _valid(stages: list[str] = STRONG, d: int = 600) -> tuple[UpdateDecoder, dict[str, Any]]:
    """A decoder holding round 0 of sender 's', and the valid round-1 blob."""
    enc = UpdateEncoder(parse_pipeline(stages), keyframe_every=0)
    dec = UpdateDecoder(d, max_frame_size=LIMIT)
    xs = walk(d, 2)
    dec.decode("s", 0, enc.encode(xs[0], 0))
    return dec, enc.encode(xs[1], 1)


def _zstd(data: bytes, *, size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=size).compress(data)


def _set(blob: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    out = copy.deepcopy(blob)
    *parents, last = path.split(".")
    target = out
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return out


_DELETE = object()
INT8, INT4, F16 = 2 << QUANT_SHIFT, 3 << QUANT_SHIFT, 1 << QUANT_SHIFT


def _raw_keyframe(body: bytes, f: int = 0, d: int = 4) -> dict[str, Any]:
    return {"f": f, "b": -1, "d": d, "n": d, "x": body}


def _sparse(body: bytes, count: int) -> dict[str, Any]:
    """A float32 top-k delta on round 0 of a 600-parameter model."""
    return {"f": DELTA | SPARSE, "b": 0, "d": 600, "n": count, "x": body}


# _valid(): top-1% of 600 = 6 int8 values, a 17-byte body (7 index + 4 scale + 6 values)
STRONG_BODY = body_size(Quantize(8), 6, 600, sparse=True)
OLD_FORMAT = {
    "stages": STRONG,
    "base": 0,
    "payload": {"dim": 600, "count": 6, "iw": 1, "data": bytes(STRONG_BODY)},
}

HOSTILE: list[tuple[str, object, str]] = [
    ("not a map", [1, 2], "must be a map"),
    ("missing key", "x", "keys must be"),
    ("extra key", ("extra", 1), "keys must be"),
    ("old format", OLD_FORMAT, "format before"),
    ("flags not int", ("f", "11"), "flags must be an integer"),
    ("flags bool", ("f", True), "flags must be an integer"),
    ("unknown flag", ("f", 32 | DELTA | SPARSE | INT8), "flags must be an integer"),
    ("flags negative", ("f", -1), "flags must be an integer"),
    ("sparse without delta", ("f", SPARSE | INT8), "without delta"),
    ("base not int", ("b", "0"), "base must be an integer"),
    ("base bool", ("b", True), "base must be an integer"),
    ("base from the future", ("b", 1), "base must be an integer"),
    ("base -1 with delta", ("b", -1), "exactly when"),
    ("base below -1", ("b", -2), "base must be an integer"),
    ("keyframe flags on a delta", ("f", INT8), "exactly when"),
    ("dim mismatch", ("d", 601), "dim must be"),
    ("count above dim", ("n", 601), "count must be"),
    ("sparse count zero", ("n", 0), "count must be"),
    ("count negative", ("n", -1), "count must be"),
    ("dense count not dim", ("f", DELTA | INT8), "count must be"),
    ("data not bin", ("x", "abc"), "data must be binary"),
    ("data too short", ("x", bytes(STRONG_BODY - 1)), f"implies {STRONG_BODY}"),
    ("data too long", ("x", bytes(STRONG_BODY + 1)), f"implies {STRONG_BODY}"),
    ("not zstd", {"f": DELTA | SPARSE | INT8 | ZSTD, "x": bytes(40)}, "not a zstd frame"),
    (
        "zstd without size",
        {"f": DELTA | SPARSE | INT8 | ZSTD, "x": _zstd(bytes(STRONG_BODY), size=False)},
        "declare",
    ),
    (
        "zstd wrong size",
        {"f": DELTA | SPARSE | INT8 | ZSTD, "x": _zstd(bytes(STRONG_BODY - 1))},
        "message needs",
    ),
]


def _edit(blob: dict[str, Any], edit: object) -> object:
    if isinstance(edit, str):
        return _set(blob, edit, _DELETE)
    if isinstance(edit, tuple):
        return _set(blob, edit[0], edit[1])
    if isinstance(edit, dict) and set(edit) < set(blob):
        return {**blob, **edit}
    return edit


@pytest.mark.parametrize(
    ("edit", "needle"), [(e, n) for _, e, n in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_blob_fields(edit: object, needle: str) -> None:
    dec, blob = _valid()
    assert blob["f"] == DELTA | SPARSE | INT8 and len(blob["x"]) == STRONG_BODY
    with pytest.raises(WireError, match=needle) as info:
        dec.decode("s", 1, _edit(blob, edit))
    assert info.value.reason == "bad_compression"
    assert dec.round_of("s") == 0  # a bad message leaves the copy alone...
    dec.decode("s", 1, blob)  # ...so the genuine one still applies


def test_zstd_only_when_it_makes_the_body_smaller() -> None:
    """A small sparse body is sent raw (a zstd frame would add ~10 bytes to it); a
    compressible dense one is compressed; the flags say which, and both decode."""
    enc = UpdateEncoder(parse_pipeline(["delta", "quantize:8", "zstd:3"]), keyframe_every=0)
    flat = np.zeros(600, dtype=np.float32)
    kf = enc.encode(flat, 0)
    assert kf["f"] == INT8 | ZSTD and len(kf["x"]) < body_size(Quantize(8), 600, 600, False)
    dec, blob = _valid()
    assert not blob["f"] & ZSTD and len(blob["x"]) == STRONG_BODY
    assert len(_zstd(blob["x"])) >= len(blob["x"])
    got = UpdateDecoder(600, max_frame_size=LIMIT).decode("t", 0, kf)
    np.testing.assert_array_equal(got, flat)
    # the same body as a zstd frame (a sender may always choose to) decodes the same
    same = {**blob, "f": blob["f"] | ZSTD, "x": _zstd(blob["x"])}
    other, _ = _valid()
    np.testing.assert_array_equal(other.decode("s", 1, same), dec.decode("s", 1, blob))


def test_decompression_bomb_is_refused_before_inflating() -> None:
    dec, blob = _valid()
    bomb = _zstd(bytes(64 << 20))  # 64 MiB of zeros in a few KiB
    assert len(bomb) < 10_000
    with pytest.raises(WireError) as info:
        dec.decode("s", 1, {**blob, "f": blob["f"] | ZSTD, "x": bomb})
    assert info.value.reason == "decompression_bomb"
    # a frame limit smaller than what the header implies is a bomb too
    small = UpdateDecoder(600, max_frame_size=100)
    with pytest.raises(WireError) as info:
        small.decode("s", 0, UpdateEncoder(parse_pipeline(["zstd:1"])).encode(walk(600, 1)[0], 0))
    assert info.value.reason == "decompression_bomb"


def test_trailing_bytes_after_the_zstd_frame() -> None:
    dec, blob = _valid()
    bad = {**blob, "f": blob["f"] | ZSTD, "x": _zstd(blob["x"]) + b"\x00"}
    with pytest.raises(WireError, match="corrupt zstd") as info:
        dec.decode("s", 1, bad)
    assert info.value.reason == "bad_compression"


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (_raw_keyframe(f32([1, 2, np.nan, 4]).tobytes()), "NaN"),
        (_raw_keyframe(np.array([1, 2, np.inf, 4], "<f2").tobytes(), F16), "NaN"),
        (_raw_keyframe(f32([np.nan]).tobytes() + bytes(4), INT8), "scales"),
        (_raw_keyframe(f32([-1.0]).tobytes() + bytes(4), INT8), "scales"),
        (_raw_keyframe(f32([1.0]).tobytes() + b"\x00\x80\x00\x00", INT8), "-128"),
        (_raw_keyframe(f32([1.0]).tobytes() + b"\x88\x08", INT4), "-8"),
        (_raw_keyframe(f32([3e38]).tobytes() + b"\x7f\x00\x00\x00", INT8), "overflow"),
        (_raw_keyframe(bytes(15)), "implies 16"),
        (_raw_keyframe(bytes(17)), "implies 16"),
        ({**_raw_keyframe(bytes(16)), "b": 0}, "exactly when"),
        (_raw_keyframe(bytes(16), DELTA), "exactly when"),
    ],
)
def test_hostile_values(blob: dict[str, Any], needle: str) -> None:
    with pytest.raises(WireError, match=needle) as info:
        UpdateDecoder(4, max_frame_size=LIMIT).decode("s", 1, blob)
    assert info.value.reason == "bad_compression"


def test_int4_padding_nibble_and_sparse_index_range() -> None:
    odd = _raw_keyframe(f32([1.0]).tobytes() + b"\x88\x98", INT4, d=3)
    with pytest.raises(WireError, match="padding"):
        UpdateDecoder(3, max_frame_size=LIMIT).decode("s", 0, odd)
    # two of 600 indices: 8 low bits each, then a 4-bit bitmap and 4 bits of padding
    assert index_size(2, 600) == 3
    dec, _ = _valid(["delta", "topk:0.5"])
    ok = _bits("00000000 01010111 1001 0000")  # indices 0 and 2 * 256 + 87 = 599
    dec.decode("s", 1, _sparse(ok + f32([1, 1]).tobytes(), 2))
    dec, _ = _valid(["delta", "topk:0.5"])
    bad = _bits("00000000 01011000 1001 0000")  # indices 0 and 600
    with pytest.raises(WireError, match="out of range"):
        dec.decode("s", 1, _sparse(bad + f32([1, 1]).tobytes(), 2))


def test_round_must_be_an_int() -> None:
    dec, blob = _valid()
    with pytest.raises(WireError, match="round"):
        dec.decode("s", "1", blob)  # type: ignore[arg-type]


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=64),
)
objects = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


def _only_typed_errors(dec: UpdateDecoder, round: int, blob: object) -> np.ndarray | None:
    before = dec.round_of("s")
    try:
        got = dec.decode("s", round, blob)
    except WireError as exc:
        assert exc.reason in REASONS, exc
        assert not exc.detail.startswith("internal"), exc
        assert dec.round_of("s") == before
        return None
    assert got.dtype == np.float32 and got.shape == (dec.dim,) and np.isfinite(got).all()
    return got


@FUZZ
@given(objects)
def test_fuzz_arbitrary_objects(blob: object) -> None:
    dec, _ = _valid()
    _only_typed_errors(dec, 1, blob)


@FUZZ
@given(
    st.sampled_from(PIPELINES),
    st.sampled_from(["f", "b", "d", "n", "x"]),
    objects,
)
def test_fuzz_one_field_replaced(stages: list[str], path: str, value: object) -> None:
    dec, blob = _valid(stages)
    _only_typed_errors(dec, 1, _set(blob, path, value))


@FUZZ
@given(st.sampled_from(PIPELINES), st.data())
def test_fuzz_corrupted_data(stages: list[str], data: st.DataObject) -> None:
    dec, blob = _valid(stages)
    raw = bytearray(blob["x"])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if action == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    _only_typed_errors(dec, 1, _set(blob, "x", bytes(raw)))


@FUZZ
@given(st.integers(0, 31), st.integers(1, 600), st.booleans(), st.data())
def test_fuzz_flags_counts_and_bodies_of_the_announced_size(
    f: int, n: int, zipped: bool, data: st.DataObject
) -> None:
    """Every flag combination and count with random bytes of exactly the size the
    header implies (raw or as a zstd frame): typed errors only, never a bad model."""
    dec, _ = _valid()
    header = {"f": f & ~ZSTD, "b": 0 if f & DELTA else -1, "d": 600, "n": n}
    try:
        parsed = parse_header({**header, "x": b""}, dim=600, round=1)
    except WireError:
        size = data.draw(st.integers(0, 64))
    else:
        size = body_size(parsed.quantize, n, 600, parsed.sparse)
    body = data.draw(st.binary(min_size=size, max_size=size))
    blob = (
        {**header, "f": header["f"] | ZSTD, "x": _zstd(body)} if zipped else {**header, "x": body}
    )
    _only_typed_errors(dec, 1, blob)


def test_codec_accepts_only_small_string_keyed_maps() -> None:
    msg = CompressedModelUpdate("s", 1, {"stages": []}, 3)
    assert decode(encode(msg)) == msg
    for blob in ({}, {1: 2}, [1], {str(i): i for i in range(MAX_BLOB_KEYS + 1)}):
        with pytest.raises(ValueError, match="blob"):
            encode(CompressedModelUpdate("s", 1, blob, 3))  # type: ignore[arg-type]


# ---------------------------------------------------------------- 5-node gossip


def _gossip(stages: list[str] | None, rounds: int = 300, d: int = 1000) -> float:
    """5 nodes on a ring, each with a private quadratic; local steps then mean gossip
    over its own model and its neighbours' x_hat. Returns the mean node's distance to
    the global optimum (the mean of the private targets)."""
    n = 5
    rng = np.random.default_rng(7)
    targets = f32(rng.normal(0.0, 1.0, (n, d)))
    x = np.zeros((n, d), dtype=np.float32)
    neighbours = [((i - 1) % n, (i + 1) % n) for i in range(n)]
    pipeline = None if stages is None else parse_pipeline(stages)
    encoders = (
        [UpdateEncoder(pipeline, keyframe_every=0, seed=i) for i in range(n)] if pipeline else []
    )
    decoders = [UpdateDecoder(d, max_frame_size=LIMIT) for _ in range(n)]
    for r in range(rounds):
        for i in range(n):  # local training: a few gradient steps with noise
            for _ in range(3):
                x[i] -= np.float32(0.1) * (x[i] - targets[i]) + f32(rng.normal(0, 0.01, d))
        seen = x.copy()  # what each receiver ends up with for each sender
        if pipeline:
            for i in range(n):
                blob = encoders[i].encode(x[i], r)
                for j in neighbours[i]:
                    seen[i] = decoders[j].decode(str(i), r, blob)
        x = np.stack([(x[i] + seen[list(neighbours[i])].sum(axis=0)) / 3 for i in range(n)])
    return float(np.linalg.norm(x.mean(axis=0) - targets.mean(axis=0)) / math.sqrt(d))


def test_five_node_gossip_with_the_strongest_pipeline_converges() -> None:
    """Start 0.45 from the optimum; uncompressed ends at the noise floor (~0.01)."""
    strongest = ["delta", "topk:0.01", "quantize:4", "zstd:3"]
    plain = _gossip(None)
    strong = _gossip(strongest)
    no_ef = _gossip(["delta", "topk:0.01:noef", "quantize:4", "zstd:3"])
    assert plain < 0.02
    assert strong < plain + 0.01, (strong, plain)
    assert no_ef > 10 * plain  # without error feedback the dropped 99% never arrives


# ---------------------------------------------------------------- scenario [compression]


def test_scenario_compression_table_feeds_node_config() -> None:
    from pathlib import Path

    from p2pfl.scenario.schema import parse_scenario

    s = parse_scenario({"nodes": 3, "compression": {"pipeline": STRONG}})
    values = s.node_config_values(["mem:a", "mem:b", "mem:c"], [Path("a"), Path("b"), Path("c")])
    assert all(v["compression"] == tuple(STRONG) for v in values)
    plain = parse_scenario({"nodes": 3}).node_config_values(["mem:a"] * 3, [Path("a")] * 3)
    assert "compression" not in plain[0]


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"pipeline": ["delta", "topk:2"]}, "compression.pipeline: bad stage 'topk:2'"),
        ({"pipeline": "zstd:3"}, "compression.pipeline: expected a list"),
        ({"pipeline": ["zstd:3"], "level": 3}, "compression.level: unknown key"),
    ],
)
def test_scenario_compression_errors_name_the_key(table: dict[str, Any], needle: str) -> None:
    from p2pfl.scenario.schema import ScenarioError, parse_scenario

    with pytest.raises(ScenarioError, match=needle.replace("(", r"\(")):
        parse_scenario({"nodes": 3, "compression": table})
