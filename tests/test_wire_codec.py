"""Codec and tensor encoding: round trips, exact wire layout, and every validation reason."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from p2pfl import PROTOCOL_VERSION
from p2pfl.wire import FrameDecoder, WireError, frame
from p2pfl.wire.codec import Limits, decode, encode, encode_frame, encode_parts
from p2pfl.wire.messages import (
    MESSAGE_TYPES,
    Bye,
    CompressedModelUpdate,
    Hello,
    Message,
    ModelUpdate,
    PeerList,
    Ping,
    Pong,
    SecureEnvelope,
    StateReply,
    StateRequest,
    UpdateRequest,
)
from p2pfl.wire.tensors import all_finite, decode_tensor, encode_tensor

PARAMS = np.linspace(-1.0, 1.0, 37, dtype=np.float32)

SAMPLES: list[Message] = [
    Hello("peer-a", 0, "lab", ("127.0.0.1:7000", "[::1]:7000"), "0.1.0"),
    Hello("peer-a", 3, "", (), ""),
    Ping("peer-b", 7, 2**63 + 5, 1234.5),
    Pong("peer-b", 7, 0, 0.0),
    PeerList("peer-c", 2, (("d" * 32, "10.0.0.4:7000"), ("e" * 32, "host.lan:7001"))),
    PeerList("peer-c", 2, ()),
    ModelUpdate("peer-f", 9, PARAMS, 120),
    ModelUpdate("peer-f", 0, np.zeros(0, dtype=np.float32), 1),
    CompressedModelUpdate(
        "peer-f", 9, {"stages": ["zstd:3"], "base": -1, "payload": {"data": b"\x00"}}, 120
    ),
    StateRequest("peer-g", 2**31 - 1),
    StateReply("peer-h", 4, PARAMS[::-1].copy(), 64),
    Bye("peer-i", 5, "shutting down"),
    Bye("peer-i", 5),
    UpdateRequest("peer-k", 11),
    SecureEnvelope("peer-j", 3, "sa_reveal", {"session": b"\x01" * 16, "group": 0}),
]


def _fields(msg: Message) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


def assert_same(a: Message, b: Message) -> None:
    assert type(a) is type(b)
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        if isinstance(fa[name], np.ndarray):
            assert fa[name].dtype == fb[name].dtype
            np.testing.assert_array_equal(fa[name], fb[name])
        else:
            assert fa[name] == fb[name], name
            assert type(fa[name]) is type(fb[name]), name


# ---------------------------------------------------------------- round trips


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert_same(decode(encode(msg)), msg)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_frames_and_memoryview(msg: Message) -> None:
    data = encode_frame(msg)
    assert data == frame(encode(msg))
    decoder = FrameDecoder()
    decoder.feed(data)
    payload = decoder.next_frame()
    assert payload is not None
    assert_same(decode(memoryview(payload)), msg)


def test_wire_layout_is_the_documented_msgpack_map() -> None:
    """Key names, order and the hand-written bin header all match plain msgpack."""
    msg = ModelUpdate("peer-f", 9, PARAMS, 120)
    expected = {
        "v": PROTOCOL_VERSION,
        "type": "model",
        "sender": "peer-f",
        "round": 9,
        "params": {"dtype": "f4", "shape": [37], "data": PARAMS.astype("<f4").tobytes()},
        "samples": 120,
    }
    assert encode(msg) == msgpack.packb(expected, use_bin_type=True)
    peers = PeerList("p", 1, (("q" * 32, "h:1"),))
    assert msgpack.unpackb(encode(peers)) == {
        "v": PROTOCOL_VERSION,
        "type": "peers",
        "sender": "p",
        "round": 1,
        "peers": [["q" * 32, "h:1"]],
    }


@pytest.mark.parametrize("n", [0, 1, 63, 64, 255 // 4, 256 // 4, 65535 // 4 + 1, 70000])
def test_bin_header_sizes_match_msgpack(n: int) -> None:
    params = np.arange(n, dtype=np.float32)
    msg = StateReply("s", 1, params, 3)
    expected = msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "type": "state",
            "sender": "s",
            "round": 1,
            "params": {"dtype": "f4", "shape": [n], "data": params.tobytes()},
            "samples": 3,
        },
        use_bin_type=True,
    )
    assert encode(msg) == expected


def test_encode_does_not_copy_params_and_decode_does_not_copy_the_bin() -> None:
    params = np.arange(1000, dtype=np.float32)
    parts = encode_parts(ModelUpdate("a", 1, params, 1))
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 1
    assert np.shares_memory(np.frombuffer(views[0], dtype=np.float32), params)
    decoded = decode(encode(ModelUpdate("a", 1, params, 1)))
    assert isinstance(decoded, ModelUpdate)
    assert not decoded.params.flags.owndata
    assert not decoded.params.flags.writeable


def test_encode_converts_numpy_ints_and_int_times() -> None:
    msg = Ping("a", np.int64(3), np.uint64(2**64 - 1), 5)  # type: ignore[arg-type]
    got = decode(encode(msg))
    assert got == Ping("a", 3, 2**64 - 1, 5.0)
    assert type(got.round) is int and type(got.sent_at) is float


def test_nan_params_pass_the_codec_and_are_flagged_by_all_finite() -> None:
    params = np.array([1.0, np.nan, 2.0], dtype=np.float32)
    got = decode(encode(ModelUpdate("a", 1, params, 1)))
    assert isinstance(got, ModelUpdate)
    assert not all_finite(got.params)


# ---------------------------------------------------------------- encode refusals


@pytest.mark.parametrize(
    ("msg", "needle"),
    [
        (Hello("", 0, "f"), "sender"),
        (Hello("x" * 129, 0, "f"), "sender"),
        (Ping("a", -1, 0, 0.0), "round"),
        (Ping("a", 0, 0, float("nan")), "sent_at"),
        (Bye("a", 0, "line\nbreak"), "reason"),
        (ModelUpdate("a", 0, np.zeros(3), 1), "params"),
        (ModelUpdate("a", 0, np.zeros((2, 2), dtype=np.float32), 1), "params"),
        (ModelUpdate("a", 0, [1.0, 2.0], 1), "params"),  # type: ignore[arg-type]
        (StateReply("a", 0, np.zeros(2, dtype=np.float32), -1), "samples"),
    ],
)
def test_encode_refuses_what_a_receiver_would_reject(msg: Message, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        encode(msg)


# ---------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([1.5, -2.25, 65504.0], dtype=np.float16),
        np.array(7.0, dtype=np.float16),  # 0-d
        np.array(-3, dtype=np.int32),
        np.arange(-128, 128, dtype=np.int8).reshape(2, 2, 4, 16),
        np.arange(256, dtype=np.uint8),
        np.array([0, 2**32 - 1], dtype=np.uint32),
        np.zeros((0, 5), dtype=np.float32),
        np.zeros((1,) * 8, dtype=np.int32),
    ],
    ids=lambda a: f"{a.dtype}{list(a.shape)}",
)
def test_tensor_round_trip(array: np.ndarray) -> None:
    obj = encode_tensor(array)
    assert set(obj) == {"dtype", "shape", "data"}
    wire = msgpack.unpackb(msgpack.packb(obj, use_bin_type=True))
    got = decode_tensor(wire)
    assert got.dtype == array.dtype.newbyteorder("<")
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_encode_tensor_is_zero_copy_for_contiguous_little_endian() -> None:
    array = np.arange(100, dtype=np.float32)
    data = encode_tensor(array)["data"]
    assert isinstance(data, memoryview)
    assert np.shares_memory(np.frombuffer(data, dtype=np.float32), array)


def test_encode_tensor_converts_big_endian_and_strided_arrays() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    obj = encode_tensor(big)
    assert obj["dtype"] == "i4"
    assert bytes(obj["data"]) == np.arange(6, dtype="<i4").tobytes()
    strided = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    obj = encode_tensor(strided)
    assert obj["shape"] == [4, 3]
    np.testing.assert_array_equal(decode_tensor({**obj, "data": bytes(obj["data"])}), strided)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(3, dtype=np.float64),
        np.zeros(3, dtype=np.int64),
        np.array([None], dtype=object),
        np.zeros(2, dtype=np.complex64),
        np.zeros((1,) * 9, dtype=np.float32),
    ],
    ids=lambda a: f"{a.dtype}-{a.ndim}d",
)
def test_encode_tensor_refuses_what_may_not_travel(array: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_tensor(array)


def _tensor(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"dtype": "f4", "shape": [2, 2], "data": bytes(16)}
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([1, 2], "must be a map"),
        ({"dtype": "f4", "shape": [0]}, "'data'"),
        ({**_tensor(), "order": "C"}, "'order'"),
        (_tensor(dtype="f8"), "'f8'"),
        (_tensor(dtype="O"), "'O'"),
        (_tensor(dtype="<f4"), "'<f4'"),
        (_tensor(dtype=1), "dtype 1"),
        (_tensor(shape=(2, 2)), "shape must be a list"),
        (_tensor(shape="22"), "shape must be a list"),
        (_tensor(shape=[4, -1]), "-1"),
        (_tensor(shape=[True, 4]), "True"),
        (_tensor(shape=[2.0, 2]), "2.0"),
        (_tensor(shape=[1] * 9), "9 dimensions"),
        (_tensor(data="x" * 16), "data must be binary"),
        (_tensor(data=bytes(15)), "needs 16 bytes, data has 15"),
        (_tensor(shape=[], data=b""), "needs 4 bytes"),
        (_tensor(shape=[0, 2**62, 2**62], data=b""), "too large"),
    ],
)
def test_decode_tensor_rejections(obj: object, needle: str) -> None:
    with pytest.raises(WireError) as info:
        decode_tensor(obj)
    assert info.value.reason == "bad_tensor"
    assert needle in info.value.detail


def test_decode_tensor_element_limit() -> None:
    assert decode_tensor(_tensor(), max_elements=4).shape == (2, 2)
    with pytest.raises(WireError, match="limit is 3"):
        decode_tensor(_tensor(), max_elements=3)


def test_decode_tensor_accepts_bytearray_and_memoryview() -> None:
    raw = np.arange(4, dtype=np.float32).tobytes()
    for data in (bytearray(raw), memoryview(raw)):
        np.testing.assert_array_equal(decode_tensor(_tensor(data=data)), [[0, 1], [2, 3]])


def test_all_finite() -> None:
    assert all_finite(np.arange(5, dtype=np.float32))
    assert all_finite(np.zeros(0, dtype=np.float32))
    assert all_finite(np.arange(5, dtype=np.int32))
    for bad in (np.nan, np.inf, -np.inf):
        a = np.ones(1000, dtype=np.float32)
        a[517] = bad
        assert not all_finite(a)
        assert not all_finite(a.astype(np.float16))


# ---------------------------------------------------------------- message validation


def _wire(msg: Message) -> dict[str, Any]:
    obj = msgpack.unpackb(encode(msg))
    assert isinstance(obj, dict)
    return obj


def _reject(obj: object, reason: str, needle: str, limits: Limits | None = None) -> None:
    payload = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(WireError) as info:
        decode(payload) if limits is None else decode(payload, limits=limits)
    assert info.value.reason == reason, info.value
    assert needle in info.value.detail, info.value


HELLO = Hello("peer-a", 1, "lab", ("h:1",), "0.1")
PING = Ping("peer-a", 1, 5, 1.5)
PEERS = PeerList("peer-a", 1, (("b" * 32, "h:2"),))
MODEL = ModelUpdate("peer-a", 1, PARAMS, 10)

Edit = Callable[[dict[str, Any]], None]


def _set(key: str, value: object) -> Edit:
    return lambda obj: obj.__setitem__(key, value)


def _drop(key: str) -> Edit:
    return lambda obj: obj.__delitem__(key)


def _tensor_edit(**changes: object) -> Edit:
    return lambda obj: obj["params"].update(changes)


@pytest.mark.parametrize(
    ("msg", "edit", "reason", "needle"),
    [
        (PING, _drop("v"), "bad_field", "v: missing"),
        (PING, _set("v", PROTOCOL_VERSION + 1), "bad_version", "v:"),
        (PING, _set("v", str(PROTOCOL_VERSION)), "bad_version", "v:"),
        (PING, _set("v", True), "bad_version", "v:"),
        (PING, _set("v", 1.0), "bad_version", "v:"),
        (PING, _drop("type"), "bad_field", "type: missing"),
        (PING, _set("type", 3), "bad_field", "type:"),
        (PING, _set("type", "Ping"), "unknown_type", "'Ping'"),
        (PING, _set("sender", ""), "bad_field", "sender:"),
        (PING, _set("sender", "x" * 129), "bad_field", "sender:"),
        (PING, _set("sender", 7), "bad_field", "sender:"),
        (PING, _set("sender", b"peer"), "bad_field", "sender:"),
        (PING, _set("sender", "evil\x1b[2J"), "bad_field", "sender:"),
        (PING, _drop("sender"), "bad_field", "sender: missing"),
        (PING, _set("round", -1), "bad_field", "round:"),
        (PING, _set("round", 2**53), "bad_field", "round:"),
        (PING, _set("round", True), "bad_field", "round:"),
        (PING, _set("round", 1.0), "bad_field", "round:"),
        (PING, _set("round", None), "bad_field", "round:"),
        (PING, _set("nonce", -1), "bad_field", "nonce:"),
        (PING, _set("nonce", False), "bad_field", "nonce:"),
        (PING, _set("sent_at", float("nan")), "bad_field", "sent_at:"),
        (PING, _set("sent_at", float("inf")), "bad_field", "sent_at:"),
        (PING, _set("sent_at", 1), "bad_field", "sent_at:"),
        (PING, _drop("sent_at"), "bad_field", "sent_at: missing"),
        (PING, _set("extra", 1), "bad_field", "'extra': unexpected"),
        (HELLO, _set("federation", 5), "bad_field", "federation:"),
        (HELLO, _set("federation", "f" * 129), "bad_field", "federation:"),
        (HELLO, _set("listen", "h:1"), "bad_field", "listen:"),
        (HELLO, _set("listen", ["h:1", 5]), "bad_field", "listen[1]:"),
        (HELLO, _set("listen", [""]), "bad_field", "listen[0]:"),
        (HELLO, _set("version", None), "bad_field", "version:"),
        (HELLO, _drop("version"), "bad_field", "version: missing"),
        (PEERS, _set("peers", {}), "bad_field", "peers:"),
        (PEERS, _set("peers", [["a", "h:1", "x"]]), "bad_field", "peers[0]:"),
        (PEERS, _set("peers", [["a" * 32, "h:1"], "b"]), "bad_field", "peers[1]:"),
        (PEERS, _set("peers", [["", "h:1"]]), "bad_field", "peers[0][0]:"),
        (PEERS, _set("peers", [["a" * 32, 1]]), "bad_field", "peers[0][1]:"),
        (MODEL, _set("samples", -1), "bad_field", "samples:"),
        (MODEL, _set("samples", True), "bad_field", "samples:"),
        (MODEL, _set("samples", 2.5), "bad_field", "samples:"),
        (MODEL, _drop("params"), "bad_field", "params: missing"),
        (MODEL, _set("params", 5), "bad_tensor", "params: tensor must be a map"),
        (MODEL, _set("params", [1.0, 2.0]), "bad_tensor", "params:"),
        (MODEL, _tensor_edit(dtype="f2"), "bad_tensor", "params:"),
        (MODEL, _tensor_edit(dtype="i4"), "bad_tensor", "params: must be a 1-D float32"),
        (MODEL, _tensor_edit(shape=[37, 1]), "bad_tensor", "params: must be a 1-D float32"),
        (MODEL, _tensor_edit(shape=[36]), "bad_tensor", "params: shape [36]"),
        (MODEL, _tensor_edit(dtype="f8", data=bytes(37 * 8)), "bad_tensor", "'f8'"),
    ],
)
def test_field_validation(msg: Message, edit: Edit, reason: str, needle: str) -> None:
    obj = _wire(msg)
    edit(obj)
    _reject(obj, reason, needle)


def test_bytes_key_is_not_a_str_key() -> None:
    obj: dict[Any, Any] = _wire(PING)
    obj[b"sender"] = obj.pop("sender")
    _reject(obj, "bad_field", "sender: missing")


def test_tensor_element_limit_from_limits() -> None:
    obj = _wire(MODEL)
    _reject(obj, "bad_tensor", "limit is 36", Limits(max_tensor_elements=36))
    assert isinstance(decode(encode(MODEL), limits=Limits(max_tensor_elements=37)), ModelUpdate)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "incomplete"),
        (b"\xc1", ""),  # never-used msgpack type byte
        (encode(PING) + b"\x00", "ExtraData"),
        (encode(PING)[:-1], "incomplete"),
        (msgpack.packb([1, 2, 3]), "must be a map"),
        (msgpack.packb("ping"), "must be a map"),
        (msgpack.packb({1: 2}), ""),  # strict_map_key
        (msgpack.packb(msgpack.ExtType(5, b"x")), "max_ext_len"),
        (b"\x82\xa1v\x01\xa1v\x01", "duplicate map key 'v'"),
        (b"\x91" * 5000 + b"\xc0", ""),  # nesting deeper than msgpack's stack
        (b"\xa3\xff\xfe\xfd", "UnicodeDecodeError"),
    ],
)
def test_malformed_payloads(payload: bytes, needle: str) -> None:
    with pytest.raises(WireError) as info:
        decode(payload)
    assert info.value.reason == "malformed"
    assert needle in info.value.detail


def test_duplicate_keys_inside_a_tensor_are_refused() -> None:
    good = encode(MODEL)
    head, tail = good.split(b"\xa5dtype\xa2f4", 1)
    forged = head[:-1] + b"\x84" + b"\xa5dtype\xa2f4\xa5dtype\xa2f4" + tail
    with pytest.raises(WireError, match="duplicate map key 'dtype'"):
        decode(forged)


@pytest.mark.parametrize(
    ("limits", "obj"),
    [
        (Limits(max_list_len=3), {**_wire(HELLO), "listen": ["a:1"] * 4}),
        (Limits(max_str_len=10), {**_wire(PING), "sender": "s" * 11}),
        (Limits(max_map_len=5), _wire(PING)),
        (Limits(max_bin_len=100), _wire(MODEL)),
    ],
)
def test_unpack_limits(limits: Limits, obj: dict[str, Any]) -> None:
    _reject(obj, "malformed", "exceeds", limits)
