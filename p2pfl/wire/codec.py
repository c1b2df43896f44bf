"""msgpack codec for the message types: bytes <-> validated dataclass instances (sans-IO).

Every message is one msgpack map: `v` (protocol version), `type`, `sender`, `round`,
then the other fields of its dataclass, in declaration order. Tuples travel as lists,
ndarrays as tensor maps (see `p2pfl.wire.tensors`).

Decoding treats the payload as hostile: msgpack runs with explicit size limits and no
ext types, duplicate map keys are refused (two parsers must never disagree about a
message), the total number of list elements and map entries is capped (tiny nested
containers would otherwise amplify a frame many times in memory), and every field of
every type is checked for type and range: addresses must be dialable
(`p2pfl.wire.address`), ids of other peers must have the shape of real peer ids,
rounds and sample counts fit in 31 bits (samples >= 1), list lengths are bounded.
Whatever the input, `decode` raises only WireError, whose `reason` is one of:

    malformed     not msgpack, trailing bytes, limits exceeded, duplicate keys, not a map
    bad_version   `v` is not PROTOCOL_VERSION
    unknown_type  `type` names no message type
    bad_field     a key is missing or unexpected, or a value has the wrong type or range
    bad_tensor    a tensor map is invalid, or params is not a 1-D float32 tensor

A compressed update's `blob` is checked here only for shape (a small string-keyed
map); `p2pfl.compression.UpdateDecoder` validates its content with its own reasons.

`encode` refuses (ValueError) a message its receiver would reject: that is a local bug,
never a peer's fault, so it must not be counted as a wire error.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from p2pfl import PROTOCOL_VERSION
from p2pfl.identity import is_peer_id
from p2pfl.wire.address import MAX_ADDR_LEN, check_peer_address
from p2pfl.wire.errors import WireError
from p2pfl.wire.framing import DEFAULT_MAX_FRAME_SIZE, frame_header
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
from p2pfl.wire.tensors import decode_tensor, encode_tensor

HEADER_KEYS = ("v", "type", "sender", "round")
MAX_PEER_ID_LEN = 128
MAX_NAME_LEN = 128
MAX_TEXT_LEN = 1024
# Exclusive bounds. No federation reaches 2**31 rounds (68 years at one a second), and a
# round far beyond it is only ever an attack on arithmetic or on tables keyed by round.
MAX_ROUND = 2**31
# A real sample count is at least 1 and fits in 31 bits; the aggregator separately caps
# each peer's weight relative to the others (p2pfl.aggregation).
MAX_SAMPLES = 2**31
MAX_NONCE = 2**64
MAX_TIME = 2.0**53  # seconds on a trio clock; finite and exact as an int
MAX_LISTEN = 16  # a node listens on a handful of addresses; the node uses at most 8
MAX_PEERS = 256  # peer exchange sends at most 64; the node reads at most 64


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps applied while unpacking, before any object is built from a hostile size."""

    max_tensor_elements: int = 256 * 1024 * 1024 // 4
    max_str_len: int = 4096
    max_list_len: int = 4096
    max_map_len: int = 64
    max_bin_len: int = DEFAULT_MAX_FRAME_SIZE
    # Total list elements + map entries in one message. A byte of msgpack can become
    # an 8-byte list slot or a 64-byte dict, so without this a 256 MiB frame of nested
    # tiny lists would cost gigabytes; real messages hold a few thousand at most.
    max_items: int = 16384
    # "mem:<name>" addresses exist only for the in-memory transport; a TCP node should
    # refuse them (it could never dial one) by passing False.
    memory_addresses: bool = True


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------- field validators


def _short(value: object) -> str:
    """A bounded repr for error messages (values come from peers and may be huge)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad_field(name: str, message: str) -> WireError:
    return WireError("bad_field", f"{name}: {message}")


def _check_str(name: str, value: object, max_len: int, *, empty: bool) -> str:
    if type(value) is not str:
        raise _bad_field(name, f"expected str, got {type(value).__name__}")
    if not empty and not value:
        raise _bad_field(name, "must not be empty")
    if len(value) > max_len:
        raise _bad_field(name, f"{len(value)} chars, at most {max_len} allowed")
    if not value.isprintable():
        raise _bad_field(name, f"contains unprintable characters: {_short(value)}")
    return value


def _check_int(name: str, value: object, low: int, high: int) -> int:
    # type() rather than isinstance(): bool is an int subclass and is not an int here.
    if type(value) is not int:
        raise _bad_field(name, f"expected int, got {type(value).__name__}")
    if not low <= value < high:
        raise _bad_field(name, f"{value} out of range [{low}, {high})")
    return value


def _peer_id(name: str, value: object, limits: Limits) -> str:
    """A sender: any short printable token. The node compares it with the id the
    transport proved (TLS certificate) before anything else, which is stricter than
    any format check; unit tests and simulations may use readable names."""
    return _check_str(name, value, MAX_PEER_ID_LEN, empty=False)


def _strict_peer_id(name: str, value: object) -> str:
    """An id a peer tells us about (peer exchange): only ever dialed with the id pinned,
    so anything that is not the shape of a real peer id is junk (see identity.py)."""
    text = _check_str(name, value, MAX_PEER_ID_LEN, empty=False)
    if not is_peer_id(text):
        raise _bad_field(name, f"not a peer id (32 lowercase base32 chars): {_short(text)}")
    return text


def _address(name: str, value: object, limits: Limits) -> str:
    text = _check_str(name, value, MAX_ADDR_LEN, empty=False)
    try:
        return check_peer_address(text, memory=limits.memory_addresses)
    except ValueError as exc:
        raise _bad_field(name, str(exc)) from None


def _name(name: str, value: object, limits: Limits) -> str:
    return _check_str(name, value, MAX_NAME_LEN, empty=True)


def _text(name: str, value: object, limits: Limits) -> str:
    return _check_str(name, value, MAX_TEXT_LEN, empty=True)


def _round(name: str, value: object, limits: Limits) -> int:
    return _check_int(name, value, 0, MAX_ROUND)


def _samples(name: str, value: object, limits: Limits) -> int:
    return _check_int(name, value, 1, MAX_SAMPLES)


def _nonce(name: str, value: object, limits: Limits) -> int:
    return _check_int(name, value, 0, MAX_NONCE)


def _time(name: str, value: object, limits: Limits) -> float:
    if type(value) is not float:
        raise _bad_field(name, f"expected float, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 <= value < MAX_TIME:
        raise _bad_field(name, f"must be in [0, 2**53), got {value}")
    return value


def _check_list(name: str, value: object, max_len: int) -> list[Any]:
    if type(value) is not list:
        raise _bad_field(name, f"expected list, got {type(value).__name__}")
    if len(value) > max_len:
        raise _bad_field(name, f"{len(value)} entries, at most {max_len} allowed")
    return value


def _addresses(name: str, value: object, limits: Limits) -> tuple[str, ...]:
    items = _check_list(name, value, min(MAX_LISTEN, limits.max_list_len))
    return tuple(_address(f"{name}[{i}]", item, limits) for i, item in enumerate(items))


def _peer_pairs(name: str, value: object, limits: Limits) -> tuple[tuple[str, str], ...]:
    items = _check_list(name, value, min(MAX_PEERS, limits.max_list_len))
    pairs = []
    for i, item in enumerate(items):
        if type(item) is not list or len(item) != 2:
            raise _bad_field(f"{name}[{i}]", f"expected [peer_id, address], got {_short(item)}")
        peer = _strict_peer_id(f"{name}[{i}][0]", item[0])
        addr = _address(f"{name}[{i}][1]", item[1], limits)
        pairs.append((peer, addr))
    return tuple(pairs)


def _check_params(name: str, array: np.ndarray) -> np.ndarray:
    if array.ndim != 1 or array.dtype != np.float32:
        raise WireError(
            "bad_tensor", f"{name}: must be a 1-D float32 tensor, got {array.ndim}-D {array.dtype}"
        )
    return array


def _params(name: str, value: object, limits: Limits) -> np.ndarray:
    try:
        array = decode_tensor(value, max_elements=limits.max_tensor_elements)
    except WireError as exc:
        raise WireError(exc.reason, f"{name}: {exc.detail}") from None
    return _check_params(name, array)


MAX_BLOB_KEYS = 16


def _blob(name: str, value: object, limits: Limits) -> dict[str, Any]:
    """Shallow check of a compressed-update blob; `UpdateDecoder` validates the inside."""
    if type(value) is not dict:
        raise _bad_field(name, f"expected map, got {type(value).__name__}")
    if not 0 < len(value) <= MAX_BLOB_KEYS:
        raise _bad_field(name, f"{len(value)} keys, 1 to {MAX_BLOB_KEYS} allowed")
    if not all(type(k) is str for k in value):
        raise _bad_field(name, "keys must be strings")
    return value


Validator = Callable[[str, object, Limits], Any]

# Every field of every type, in wire order; `v` and `type` are handled separately.
_COMMON: dict[str, Validator] = {"sender": _peer_id, "round": _round}
SCHEMAS: dict[type[Any], dict[str, Validator]] = {
    Hello: {
        **_COMMON,
        "federation": _name,
        "listen": _addresses,
        "version": _name,
        "fingerprint": _name,
    },
    Ping: {**_COMMON, "nonce": _nonce, "sent_at": _time},
    Pong: {**_COMMON, "nonce": _nonce, "sent_at": _time},
    PeerList: {**_COMMON, "peers": _peer_pairs},
    ModelUpdate: {**_COMMON, "params": _params, "samples": _samples},
    CompressedModelUpdate: {**_COMMON, "blob": _blob, "samples": _samples},
    StateRequest: dict(_COMMON),
    StateReply: {**_COMMON, "params": _params, "samples": _samples},
    Bye: {**_COMMON, "reason": _text},
    SecureEnvelope: {**_COMMON, "kind": _name, "body": _blob},
    UpdateRequest: dict(_COMMON),
}
_TENSOR_FIELDS = frozenset({"params"})


def _check_schemas() -> None:
    """The schema table must cover every message type and field exactly (import-time)."""
    assert set(SCHEMAS) == set(MESSAGE_TYPES.values())
    for cls, schema in SCHEMAS.items():
        assert list(schema) == [f.name for f in dataclasses.fields(cls)], cls


_check_schemas()


# ---------------------------------------------------------------- encoding

_BIN8, _BIN16, _BIN32 = struct.Struct(">BB"), struct.Struct(">BH"), struct.Struct(">BI")


def _bin_header(n: int) -> bytes:
    """msgpack bin 8/16/32 header; written by hand so the data itself is never copied."""
    if n < 1 << 8:
        return _BIN8.pack(0xC4, n)
    if n < 1 << 16:
        return _BIN16.pack(0xC5, n)
    if n < 1 << 32:
        return _BIN32.pack(0xC6, n)
    raise ValueError(f"binary of {n} bytes exceeds msgpack's 4 GiB limit")


def _wire_value(name: str, value: object) -> object:
    """Turn a dataclass value into its msgpack form (tuples -> lists, numpy scalars -> int)."""
    if name in ("round", "samples", "nonce"):
        return operator.index(value)  # type: ignore[arg-type]
    if name == "sent_at":
        return float(value)  # type: ignore[arg-type]
    if name == "listen":
        return list(value)  # type: ignore[call-overload]
    if name == "peers":
        return [[peer, addr] for peer, addr in value]  # type: ignore[attr-defined]
    return value


def encode_parts(msg: Message) -> list[bytes | memoryview]:
    """Encode `msg` as a list of buffers whose concatenation is the msgpack payload.

    Tensor data appears as memoryviews of the original arrays (no copy), so a caller
    with scatter-gather I/O can send without ever copying the model.
    """
    cls = type(msg)
    schema = SCHEMAS.get(cls)
    if schema is None:
        raise ValueError(f"not a message type: {cls.__name__}")
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    parts: list[bytes | memoryview] = []
    packer.pack_map_header(len(schema) + 2)
    packer.pack("v")
    packer.pack(PROTOCOL_VERSION)
    packer.pack("type")
    packer.pack(cls.TYPE)
    for name, validator in schema.items():
        value = getattr(msg, name)
        packer.pack(name)
        if name in _TENSOR_FIELDS:
            if not isinstance(value, np.ndarray):
                raise ValueError(f"refusing to encode {cls.__name__}: {name} is not an ndarray")
            try:
                _check_params(name, value)
            except WireError as exc:
                raise ValueError(f"refusing to encode {cls.__name__}: {exc.detail}") from None
            tensor = encode_tensor(value)
            data = tensor["data"]
            packer.pack_map_header(3)
            packer.pack("dtype")
            packer.pack(tensor["dtype"])
            packer.pack("shape")
            packer.pack(tensor["shape"])
            packer.pack("data")
            parts.append(packer.bytes())
            packer.reset()
            parts.append(_bin_header(data.nbytes))
            parts.append(data)
            continue
        wire = _wire_value(name, value)
        try:
            validator(name, wire, DEFAULT_LIMITS)
        except WireError as exc:
            raise ValueError(f"refusing to encode {cls.__name__}: {exc.detail}") from None
        packer.pack(wire)
    parts.append(packer.bytes())
    return parts


def encode(msg: Message) -> bytes:
    """The msgpack payload of `msg` (tensor data copied exactly once)."""
    return b"".join(encode_parts(msg))


def encode_frame(msg: Message) -> bytes:
    """Frame header + payload in one buffer, still copying tensor data only once."""
    parts = encode_parts(msg)
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return b"".join([frame_header(size), *parts])


# ---------------------------------------------------------------- decoding


class _ItemBudget:
    """msgpack hooks that count every list element and map entry of one payload.

    They run as each container is finished, so at most one container beyond the budget
    (itself capped by max_list_len / max_map_len) is ever built.
    """

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def _spend(self, n: int) -> None:
        self.left -= n + 1
        if self.left < 0:
            raise WireError("malformed", "too many items (nested lists/maps) in one message")

    def list_hook(self, items: list[Any]) -> list[Any]:
        self._spend(len(items))
        return items

    def pairs_hook(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """Also refuse duplicate keys instead of silently keeping the last."""
        self._spend(len(pairs))
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[Any] = set()
            for key, _ in pairs:
                if key in seen:
                    raise WireError("malformed", f"duplicate map key {_short(key)}")
                seen.add(key)
        return result


def decode(payload: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and fully validate one payload; raises only WireError, whatever the input.

    Tensor fields are read-only arrays over the unpacked bin (np.frombuffer, no copy).
    """
    budget = _ItemBudget(limits.max_items)
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            list_hook=budget.list_hook,
            object_pairs_hook=budget.pairs_hook,
            max_bin_len=limits.max_bin_len,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_list_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises many types; all mean "not a valid payload"
        detail = f"{type(exc).__name__}: {_short(str(exc))}" if str(exc) else type(exc).__name__
        raise WireError("malformed", f"not a valid msgpack payload ({detail})") from None
    try:
        return _from_map(obj, limits)
    except WireError:
        raise
    except Exception as exc:  # pragma: no cover - defence in depth, fuzzed to stay unused
        raise WireError(
            "malformed", f"internal decoder error {type(exc).__name__}: {_short(str(exc))}"
        ) from exc


def _from_map(obj: object, limits: Limits) -> Message:
    if type(obj) is not dict:
        raise WireError("malformed", f"payload must be a map, got {type(obj).__name__}")
    if "v" not in obj:
        raise _bad_field("v", "missing key")
    version = obj["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(
            "bad_version", f"v: protocol version {_short(version)}, expected {PROTOCOL_VERSION}"
        )
    if "type" not in obj:
        raise _bad_field("type", "missing key")
    type_name = obj["type"]
    if type(type_name) is not str:
        raise _bad_field("type", f"expected str, got {type(type_name).__name__}")
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise WireError("unknown_type", f"type: unknown message type {_short(type_name)}")
    schema = SCHEMAS[cls]
    for name in schema:
        if name not in obj:
            raise _bad_field(name, f"missing key in {type_name!r} message")
    if len(obj) != len(schema) + 2:
        extra = sorted(_short(k) for k in obj if k not in schema and k not in HEADER_KEYS)
        raise WireError(
            "bad_field", f"{extra[0]}: unexpected key in {type_name!r} message ({', '.join(extra)})"
        )
    fields = {name: validator(name, obj[name], limits) for name, validator in schema.items()}
    return cls(**fields)
