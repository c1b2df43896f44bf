"""The sans-IO outbox: payloads per neighbour, keyframes, resends."""

from __future__ import annotations

import numpy as np

from p2pfl.compression import UpdateDecoder, parse_pipeline
from p2pfl.node.outbox import RESEND_ROUNDS, UpdateOutbox
from p2pfl.wire import codec
from p2pfl.wire.messages import CompressedModelUpdate, ModelUpdate

D = 64


def model(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def test_plain_updates_share_one_payload_and_are_kept_for_resends() -> None:
    box = UpdateOutbox("me", None, per_peer=False)
    out = box.payloads(0, model(0), 10, ["a", "b"])
    assert out["a"] is out["b"]  # encoded once
    msg = codec.decode(out["a"])
    assert isinstance(msg, ModelUpdate) and msg.samples == 10
    np.testing.assert_array_equal(msg.params, model(0))
    assert box.last_sizes == (4 * D, len(out["a"]))
    for r in range(1, 5):
        box.payloads(r, model(r), 10, ["a"])
    assert box.resend("a", 4) is not None and box.resend("b", 4) is None
    assert box.resend("a", 4 - RESEND_ROUNDS) is not None
    assert box.resend("a", 4 - RESEND_ROUNDS - 1) is None  # bounded


def test_per_peer_delta_streams_decode_for_each_receiver() -> None:
    pipeline = parse_pipeline(["delta", "topk:0.25", "quantize:8"])
    box = UpdateOutbox("me", pipeline, per_peer=True, keyframe_every=0)
    decoders = {p: UpdateDecoder(D, max_frame_size=1 << 20) for p in ("a", "b")}
    # Neighbours vary per round: "b" misses round 1, yet never misses a base.
    schedule = [["a", "b"], ["a"], ["a", "b"], ["b"]]
    for r, peers in enumerate(schedule):
        for peer, payload in box.payloads(r, model(r), 1, peers).items():
            msg = codec.decode(payload)
            assert isinstance(msg, CompressedModelUpdate)
            decoders[peer].decode(peer, r, msg.blob)  # raises on a missing base


def test_a_dropped_shared_payload_makes_the_next_one_a_keyframe() -> None:
    pipeline = parse_pipeline(["delta", "topk:0.25", "quantize:8"])
    box = UpdateOutbox("me", pipeline, per_peer=False, keyframe_every=0)
    dec = UpdateDecoder(D, max_frame_size=1 << 20)
    first = codec.decode(box.payloads(0, model(0), 1, ["a"])["a"])
    assert isinstance(first, CompressedModelUpdate)
    dec.decode("me", 0, first.blob)
    box.payloads(1, model(1), 1, ["a"])  # never delivered
    box.dropped("a")
    third = codec.decode(box.payloads(2, model(2), 1, ["a"])["a"])
    assert isinstance(third, CompressedModelUpdate)
    dec.decode("me", 2, third.blob)  # a keyframe: decodes without round 1's base
