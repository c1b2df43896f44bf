"""Secure-aggregation group messages <-> the wire's `SecureEnvelope` (kind + msgpack body).

The body is hostile input: every key must be exactly the message's fields, lists become
tuples, a vector must be a 1-D tensor of its kind's dtype, and the message's own
`__post_init__` checks ranges. On top of that, what only the wire can know: ids of
other peers must have the shape of real peer ids (sans-IO tests use short names, so
`__post_init__` does not insist), and an offered vector length must fit the local
model. Anything wrong raises the wire's one typed error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from p2pfl.identity import is_peer_id
from p2pfl.secure.group_messages import (
    GROUP_MESSAGE_TYPES,
    TENSOR_FIELDS,
    GroupMessage,
    GroupOffer,
    MaskList,
    Relayed,
    Sealed,
    Unmasking,
    UnmaskList,
)
from p2pfl.secure.group_messages import GroupMean as GroupMeanMsg
from p2pfl.wire.errors import WireError
from p2pfl.wire.messages import SecureEnvelope
from p2pfl.wire.tensors import decode_tensor, encode_tensor

_HEADER = ("sender", "round")


def to_envelope(msg: GroupMessage) -> SecureEnvelope:
    body: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        if f.name in _HEADER:
            continue
        value = getattr(msg, f.name)
        body[f.name] = encode_tensor(value) if isinstance(value, np.ndarray) else _listify(value)
    return SecureEnvelope(msg.sender, msg.round, msg.TYPE, body)


def group_from_envelope(env: SecureEnvelope, *, max_dim: int) -> GroupMessage:
    """A group message from its envelope (docs/secure-aggregation.md): exact field set,
    tensor dtype and size, real peer ids, dim bounds."""
    cls = GROUP_MESSAGE_TYPES.get(env.kind)
    if cls is None:
        raise WireError("unknown_type", f"group message kind {env.kind!r}")
    msg: GroupMessage = _build(env, cls, TENSOR_FIELDS.get(env.kind), max_dim)
    ids: tuple[str, ...] = ()
    if isinstance(msg, GroupOffer):
        if msg.dim > max_dim:
            raise _bad(msg, f"dim: {msg.dim} exceeds the local model size {max_dim}")
        ids = msg.choosers
    elif isinstance(msg, MaskList | UnmaskList | GroupMeanMsg):
        ids = msg.members
    elif isinstance(msg, Unmasking):
        ids = tuple(p for p, _ in (*msg.seed_shares, *msg.key_shares))
    elif isinstance(msg, Sealed | Relayed):
        ids = (msg.peer,)
    _check_ids(msg, "peers", ids)
    return msg


def _build(
    env: SecureEnvelope, cls: type, tensor: tuple[str, np.dtype] | None, max_dim: int
) -> Any:
    """`cls` from the body: exactly its fields, lists as tuples, the one tensor field
    (if any) a 1-D array of its dtype within `max_dim`; the class's own checks (ranges,
    shapes) turn into the wire's typed error."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _HEADER]
    if set(env.body) != set(names):
        missing = sorted(set(names) - set(env.body))
        extra = sorted(set(env.body) - set(names))
        raise WireError("bad_field", f"{env.kind}: missing {missing}, unexpected {extra}")
    kwargs: dict[str, Any] = {"sender": env.sender, "round": env.round}
    for name in names:
        value = env.body[name]
        if tensor is not None and name == tensor[0]:
            arr = decode_tensor(value, max_elements=max_dim)
            if arr.dtype != tensor[1] or arr.ndim != 1:
                raise WireError(
                    "bad_tensor", f"{env.kind}.{name}: expected a 1-D {tensor[1]} tensor"
                )
            kwargs[name] = arr
        else:
            kwargs[name] = _tuplify(value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise WireError("bad_field", f"{env.kind}: {exc}") from None


def _bad(msg: GroupMessage, message: str) -> WireError:
    return WireError("bad_field", f"{msg.TYPE}: {message}")


def _check_ids(msg: GroupMessage, name: str, ids: tuple[str, ...]) -> None:
    for i, peer in enumerate(ids):
        if not is_peer_id(peer):
            raise _bad(msg, f"{name}[{i}]: not a peer id")


def _listify(value: object) -> object:
    if isinstance(value, tuple):
        return [_listify(v) for v in value]
    return value


def _tuplify(value: object, depth: int = 0) -> object:
    if isinstance(value, list):
        if depth > 2:
            raise WireError("bad_field", "secure message nested too deeply")
        return tuple(_tuplify(v, depth + 1) for v in value)
    return value
