"""Hypothesis fuzzing of `decode`: whatever the bytes, only WireError escapes.

Whatever decode accepts must also be re-encodable and decode to the same message, so
the encode-side and decode-side checks can never disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl import PROTOCOL_VERSION
from p2pfl.wire import WireError
from p2pfl.wire.codec import DEFAULT_LIMITS, SCHEMAS, Limits, decode, encode
from p2pfl.wire.messages import (
    MESSAGE_TYPES,
    Bye,
    Hello,
    Message,
    ModelUpdate,
    PeerList,
    Ping,
    Pong,
    StateReply,
    StateRequest,
)

REASONS = {"malformed", "bad_version", "unknown_type", "bad_field", "bad_tensor"}
FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

printable = st.characters(categories=["L", "N", "P", "S"])
peer_ids = st.text(printable, min_size=1, max_size=128)
# Ids of other peers (peer exchange) must have the shape of real ones; addresses must parse.
real_ids = st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=32, max_size=32)
names = st.text(printable, max_size=128)
addresses = st.one_of(
    st.builds("{}.{}.{}.{}:{}".format, *[st.integers(0, 255)] * 4, st.integers(1, 65535)),
    st.builds("[::{:x}]:{}".format, st.integers(0, 0xFFFF), st.integers(1, 65535)),
    st.builds(
        "{}:{}".format,
        st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True),
        st.integers(1, 65535),
    ),
    st.from_regex(r"mem:[A-Za-z0-9._-]{1,64}", fullmatch=True),
)
rounds = st.integers(min_value=0, max_value=2**31 - 1)
samples = st.integers(min_value=1, max_value=2**31 - 1)
nonces = st.integers(min_value=0, max_value=2**64 - 1)
times = st.floats(min_value=0.0, max_value=2.0**53, exclude_max=True)
params = hnp.arrays(np.float32, st.integers(min_value=0, max_value=40))

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, peer_ids, rounds, names, st.lists(addresses, max_size=4).map(tuple), names),
    st.builds(Ping, peer_ids, rounds, nonces, times),
    st.builds(Pong, peer_ids, rounds, nonces, times),
    st.builds(PeerList, peer_ids, rounds, st.lists(st.tuples(real_ids, addresses)).map(tuple)),
    st.builds(ModelUpdate, peer_ids, rounds, params, samples),
    st.builds(StateRequest, peer_ids, rounds),
    st.builds(StateReply, peer_ids, rounds, params, samples),
    st.builds(Bye, peer_ids, rounds, st.text(printable, max_size=200)),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=40),
)
msgpack_objects = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=10), st.binary(max_size=5)), inner, max_size=5),
    ),
    max_leaves=20,
)


# ---------------------------------------------------------------- helpers


def _same(a: Message, b: Message) -> bool:
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if x.dtype != y.dtype or not np.array_equal(x, y, equal_nan=True):
                return False
        elif x != y and not (x != x and y != y):  # NaN-safe equality
            return False
    return True


def check(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Message | None:
    """Decode; on success re-encode and compare; any non-WireError fails the test."""
    try:
        msg = decode(payload, limits=limits)
    except WireError as exc:
        assert exc.reason in REASONS, exc
        assert not exc.detail.startswith("internal"), exc
        return None
    assert isinstance(msg, tuple(MESSAGE_TYPES.values()))
    assert _same(decode(encode(msg)), msg)
    return msg


def _wire_dict(msg: Message) -> dict[str, Any]:
    obj = msgpack.unpackb(encode(msg))
    assert isinstance(obj, dict)
    return obj


# ---------------------------------------------------------------- properties


@FUZZ
@given(messages)
def test_valid_messages_round_trip(msg: Message) -> None:
    got = check(encode(msg))
    assert got is not None and _same(got, msg)


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes(payload: bytes) -> None:
    check(payload)


@FUZZ
@given(msgpack_objects)
def test_arbitrary_msgpack_objects(obj: object) -> None:
    check(msgpack.packb(obj, use_bin_type=True))
    check(msgpack.packb(obj, use_bin_type=True), Limits(max_list_len=2, max_str_len=5))


@FUZZ
@given(messages, st.data())
def test_valid_header_with_random_field_values(msg: Message, data: st.DataObject) -> None:
    """Start from a valid map and replace, drop or add fields: reaches every validator."""
    obj = _wire_dict(msg)
    keys = ["v", "type", *SCHEMAS[type(msg)]]
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        action = data.draw(st.sampled_from(["replace", "drop"]))
        if action == "drop":
            del obj[key]
        else:
            obj[key] = data.draw(msgpack_objects)
    if data.draw(st.booleans()):
        obj[data.draw(st.text(max_size=8))] = data.draw(msgpack_objects)
    if "params" in obj and isinstance(obj["params"], dict) and data.draw(st.booleans()):
        tensor_key = data.draw(st.sampled_from(["dtype", "shape", "data"]))
        obj["params"][tensor_key] = data.draw(msgpack_objects)
    got = check(msgpack.packb(obj, use_bin_type=True))
    if got is not None:
        assert obj["v"] == PROTOCOL_VERSION and obj["type"] == type(got).TYPE


@FUZZ
@given(messages, st.data())
def test_bit_flips_of_valid_encodings(msg: Message, data: st.DataObject) -> None:
    payload = bytearray(encode(msg))
    positions = st.integers(min_value=0, max_value=len(payload) * 8 - 1)
    for bit in data.draw(st.lists(positions, min_size=1, max_size=4)):
        payload[bit // 8] ^= 1 << (bit % 8)
    check(bytes(payload))


@FUZZ
@given(messages, st.data())
def test_truncations_and_insertions_of_valid_encodings(msg: Message, data: st.DataObject) -> None:
    payload = encode(msg)
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    assert check(payload[:cut]) is None  # every strict prefix is incomplete
    where = data.draw(st.integers(min_value=0, max_value=len(payload)))
    junk = data.draw(st.binary(min_size=1, max_size=8))
    check(payload[:where] + junk + payload[where:])
    check(payload[:where] + payload[where + len(junk) :])


ITEMSIZE = {"f4": 4, "f2": 2, "i1": 1, "u1": 1, "i4": 4, "u4": 4, "f8": 8}


@st.composite
def tensor_maps(draw: st.DrawFn) -> dict[str, Any]:
    """Near-valid tensors: allowed dtypes, small shapes, data lengths off by a little."""
    code = draw(st.sampled_from(sorted(ITEMSIZE)))
    shape = draw(
        st.one_of(
            st.lists(st.integers(min_value=0, max_value=6), max_size=3),
            st.lists(st.integers(min_value=-2, max_value=2**64 - 1), max_size=10),
        )
    )
    count = 1
    for dim in shape:
        count *= max(dim, 0)
    size = min(count, 64) * ITEMSIZE[code] + draw(st.sampled_from([0, 0, 0, -1, 1, 4]))
    return {"dtype": code, "shape": shape, "data": bytes(max(size, 0))}


@FUZZ
@given(tensor_maps(), st.sampled_from([ModelUpdate, StateReply]))
def test_plausible_tensor_maps(
    tensor: dict[str, Any], cls: type[ModelUpdate] | type[StateReply]
) -> None:
    """Accepted tensors always have exactly the announced shape and byte length."""
    obj = _wire_dict(cls("a", 1, np.zeros(3, dtype=np.float32), 1))
    obj["params"] = tensor
    got = check(msgpack.packb(obj, use_bin_type=True))
    if got is not None:
        assert isinstance(got, ModelUpdate | StateReply)
        assert got.params.nbytes == len(tensor["data"])
        assert list(got.params.shape) == tensor["shape"]
