"""Fuzz the whole receive path a node runs on a peer's bytes, minus the I/O:

    stream chunks -> FrameDecoder -> msgpack codec -> message -> tensor / compressed
    blob -> UpdateDecoder (decompression, dequantization, delta) -> RoundMachine checks

Whatever the bytes, only WireError may come out of the decoding stages (the node
counts it by reason), the round machine must reject anything that is not a finite
float32 model of the right size, and valid traffic must come through unchanged however
the stream is chunked. The CI budget is fixed and derandomized (a few seconds);
`benchmarks/fuzz_decode.py` runs the same properties with a much larger budget by
setting P2PFL_FUZZ_EXAMPLES (and P2PFL_FUZZ_RANDOM=1 for fresh random seeds).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from p2pfl import PROTOCOL_VERSION
from p2pfl.aggregation import get_rule
from p2pfl.compression import REASONS as COMPRESSION_REASONS
from p2pfl.compression import UpdateDecoder, UpdateEncoder, parse_pipeline
from p2pfl.protocol import Rejected, RoundMachine, RoundSettings
from p2pfl.wire import codec
from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import FrameDecoder, frame
from p2pfl.wire.messages import (
    CompressedModelUpdate,
    Hello,
    Message,
    ModelUpdate,
    Ping,
    StateReply,
)

DIM = 40
MAX_FRAME = 64 * 1024
LIMITS = codec.Limits(max_bin_len=MAX_FRAME)
WIRE_REASONS = {"malformed", "bad_version", "unknown_type", "bad_field", "bad_tensor", "oversize"}
REASONS = WIRE_REASONS | set(COMPRESSION_REASONS)
MACHINE_REASONS = {"stale", "too_far_ahead", "duplicate", "bad_shape", "bad_samples", "non_finite"}

EXAMPLES = int(os.environ.get("P2PFL_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("P2PFL_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
PIPELINES = [
    (),
    ("delta",),
    ("delta", "topk:0.25"),
    ("quantize:8",),
    ("delta", "topk:0.3", "quantize:4", "zstd:3"),
    ("delta", "quantize:16", "zstd:1"),
]


@dataclass
class DecodePath:
    """A node's receive path for one peer, as pure code."""

    frames: FrameDecoder = field(default_factory=lambda: FrameDecoder(MAX_FRAME))
    updates: UpdateDecoder = field(
        default_factory=lambda: UpdateDecoder(DIM, max_frame_size=MAX_FRAME)
    )
    machine: RoundMachine = field(
        default_factory=lambda: RoundMachine(
            params=np.zeros(DIM, np.float32),
            rule=get_rule("mean"),
            settings=RoundSettings(target_rounds=0, max_rounds_ahead=10**6),
        )
    )
    rejected: Counter[str] = field(default_factory=Counter)
    messages: list[Message] = field(default_factory=list)
    models: list[np.ndarray] = field(default_factory=list)
    broken: bool = False  # a framing error: the node hangs up

    def feed(self, chunk: bytes) -> None:
        if self.broken:
            return
        self.frames.feed(chunk)
        while True:
            try:
                payload = self.frames.next_frame()
            except WireError as exc:
                self._reject(exc)
                self.broken = True
                return
            if payload is None:
                return
            self._payload(payload)

    def _reject(self, exc: WireError) -> None:
        assert exc.reason in REASONS, exc
        assert "internal" not in exc.detail, exc
        self.rejected[exc.reason] += 1
        event(f"rejected: {exc.reason}")

    def _payload(self, payload: bytes) -> None:
        try:
            msg = codec.decode(payload, limits=LIMITS)
            params: np.ndarray | None = None
            samples = 0
            if isinstance(msg, CompressedModelUpdate):
                params, samples = self.updates.decode(msg.sender, msg.round, msg.blob), msg.samples
            elif isinstance(msg, ModelUpdate | StateReply):
                params, samples = msg.params, getattr(msg, "samples", 1)
        except WireError as exc:
            self._reject(exc)
            return
        self.messages.append(msg)
        if params is None:
            return
        # What reaches the aggregation: the machine's own checks are the last gate.
        actions = self.machine.receive_update(0.0, msg.sender, msg.round, params, samples)
        rejections = [a for a in actions if isinstance(a, Rejected)]
        for r in rejections:
            assert r.reason in MACHINE_REASONS, r
            self.rejected[r.reason] += 1
            event(f"machine rejected: {r.reason}")
        if not rejections:
            assert params.dtype == np.float32 and params.shape == (DIM,)
            assert np.isfinite(params).all()
            self.models.append(params)
            event(f"model accepted: {type(msg).__name__}")


# ---- strategies ------------------------------------------------------------------------

models = st.builds(
    lambda seed, scale: (np.random.default_rng(seed).standard_normal(DIM) * scale).astype(
        np.float32
    ),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1e-3, 1.0, 1e3]),
)


@st.composite
def traffic(draw: st.DrawFn) -> list[bytes]:
    """A plausible conversation from one peer: hello, pings, models, compressed models."""
    sender = draw(st.sampled_from(["peerA", "b" * 32]))
    stages = draw(st.sampled_from(PIPELINES))
    encoder = UpdateEncoder(parse_pipeline(stages), keyframe_every=draw(st.integers(0, 3)))
    out: list[Message] = [Hello(sender, 0, "default", ("127.0.0.1:7470",), "0.1")]
    for rnd in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["plain", "compressed", "state", "ping"]))
        if kind == "plain":
            out.append(ModelUpdate(sender, rnd, draw(models), draw(st.integers(1, 500))))
        elif kind == "compressed":
            blob = encoder.encode(draw(models), rnd)
            out.append(CompressedModelUpdate(sender, rnd, blob, draw(st.integers(1, 500))))
        elif kind == "state":
            out.append(StateReply(sender, rnd, draw(models), 10))
        else:
            out.append(Ping(sender, rnd, rnd, 1.5))
    return [frame(codec.encode(m)) for m in out]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def encoded(messages: list[Message]) -> list[bytes]:
    return [codec.encode(m) for m in messages]


def run(chunks: list[bytes]) -> DecodePath:
    path = DecodePath()
    for c in chunks:
        path.feed(c)
    return path


# ---- properties ------------------------------------------------------------------------


@FUZZ
@given(traffic(), st.lists(st.integers(0, 10**6), max_size=8))
def test_valid_traffic_arrives_intact_however_chunked(frames: list[bytes], cuts: list[int]) -> None:
    whole = run(frames)
    assert not whole.rejected and not whole.broken
    assert len(whole.messages) == len(frames)
    pieces = run(chunked(b"".join(frames), cuts))
    assert encoded(pieces.messages) == encoded(whole.messages) == [f[4:] for f in frames]
    assert len(pieces.models) == len(whole.models)
    for a, b in zip(pieces.models, whole.models, strict=True):
        assert np.array_equal(a, b)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes(chunks: list[bytes]) -> None:
    run(chunks)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_arbitrary_payloads_in_valid_frames(payloads: list[bytes]) -> None:
    path = run([frame(p) for p in payloads])
    assert not path.broken
    assert len(path.messages) + sum(path.rejected[r] for r in REASONS) == len(payloads)


@FUZZ
@given(traffic(), st.data())
def test_mutated_traffic(frames: list[bytes], data: st.DataObject) -> None:
    """Bit flips, a truncation or an insertion anywhere: the untouched frames before the
    first damaged byte still decode exactly as sent."""
    stream = bytearray(b"".join(frames))
    where = data.draw(st.integers(0, len(stream) - 1))
    how = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            bit = data.draw(st.integers(where * 8, len(stream) * 8 - 1))
            stream[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        del stream[where:]
    else:
        stream[where:where] = data.draw(st.binary(min_size=1, max_size=16))
    intact = 0
    offset = 0
    for f in frames:
        if offset + len(f) > where:
            break
        offset += len(f)
        intact += 1
    clean = run(frames[:intact])
    damaged = run(chunked(bytes(stream), data.draw(st.lists(st.integers(0, 10**6), max_size=4))))
    assert encoded(damaged.messages[:intact]) == encoded(clean.messages)
    for a, b in zip(damaged.models, clean.models, strict=False):
        assert np.array_equal(a, b)


@FUZZ
@given(
    st.sampled_from(PIPELINES[1:]),
    st.lists(models, min_size=2, max_size=3),
    st.sampled_from(["f", "b", "d", "n", "x"]),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=12),
        st.binary(max_size=64),
        st.lists(st.text(max_size=12), max_size=5),
    ),
)
def test_compressed_blob_fields_replaced(
    stages: tuple[str, ...], params: list[np.ndarray], key: str, value: Any
) -> None:
    encoder = UpdateEncoder(parse_pipeline(stages), keyframe_every=0)
    path = DecodePath()
    for rnd, p in enumerate(params):
        blob = encoder.encode(p, rnd)
        if rnd == len(params) - 1:
            blob[key] = value
        raw = msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "type": "model_z",
                "sender": "peerA",
                "round": rnd,
                "blob": blob,
                "samples": 5,
            },
            use_bin_type=True,
        )
        path.feed(frame(raw))
    assert len(path.models) >= len(params) - 1


@FUZZ
@given(st.sampled_from(PIPELINES[1:]), st.lists(models, min_size=1, max_size=4), st.data())
def test_compressed_data_bytes_mangled(
    stages: tuple[str, ...], params: list[np.ndarray], data: st.DataObject
) -> None:
    """Damage inside the body (zstd frames, quantized values, index codes): never a crash,
    never a non-finite model, never a copy corrupted by a rejected message."""
    encoder = UpdateEncoder(parse_pipeline(stages), keyframe_every=0)
    path = DecodePath()
    for rnd, p in enumerate(params):
        blob = encoder.encode(p, rnd)
        body = bytearray(blob["x"])
        if body and data.draw(st.booleans()):
            for _ in range(data.draw(st.integers(1, 3))):
                i = data.draw(st.integers(0, len(body) - 1))
                body[i] ^= data.draw(st.integers(1, 255))
        if data.draw(st.booleans()):
            body = body[: data.draw(st.integers(0, len(body)))]
        blob["x"] = bytes(body)
        before = path.updates.round_of("peerA")
        rejected = sum(path.rejected.values())
        path.feed(frame(codec.encode(CompressedModelUpdate("peerA", rnd, blob, 5))))
        if sum(path.rejected.values()) > rejected:
            assert path.updates.round_of("peerA") == before  # a bad message changes nothing
        else:
            assert path.updates.round_of("peerA") == rnd
