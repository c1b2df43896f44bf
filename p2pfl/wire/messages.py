"""Message types exchanged between peers.

Every message travels as one msgpack map with the common header keys
`v` (protocol version), `type`, `sender` (peer id) and `round`, plus the fields of its
type. The classes here are plain values; `p2pfl.wire.codec` turns them into bytes and
back, validating every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on every connection, both directions."""

    TYPE = "hello"
    sender: str
    round: int
    federation: str
    listen: tuple[str, ...] = ()
    version: str = ""
    # What the sender's model and task look like (p2pfl.learning.fingerprint): peers
    # whose fingerprints differ cannot learn together and are refused at once.
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    """Heartbeat; answered by a Pong echoing nonce and sent_at (gives RTT)."""

    TYPE = "ping"
    sender: str
    round: int
    nonce: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE = "pong"
    sender: str
    round: int
    nonce: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class PeerList:
    """Peer exchange: (peer id, "host:port") pairs the sender is connected to."""

    TYPE = "peers"
    sender: str
    round: int
    peers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class ModelUpdate:
    """A node's locally trained model for `round`, weighted by its sample count."""

    TYPE = "model"
    sender: str
    round: int
    params: np.ndarray = field(repr=False)
    samples: int


@dataclass(frozen=True, slots=True)
class CompressedModelUpdate:
    """A ModelUpdate through a compression pipeline (see `p2pfl.compression`).

    `blob` is the compressor's self-describing map; the codec checks only its shape
    (a small map with string keys), `UpdateDecoder` validates the rest.
    """

    TYPE = "model_z"
    sender: str
    round: int
    blob: dict[str, Any] = field(repr=False)
    samples: int


@dataclass(frozen=True, slots=True)
class StateRequest:
    """Ask a peer for its current model (catch-up after restart or lag)."""

    TYPE = "state_req"
    sender: str
    round: int


@dataclass(frozen=True, slots=True, eq=False)
class StateReply:
    """A peer's current model: the model it starts `round` from."""

    TYPE = "state"
    sender: str
    round: int
    params: np.ndarray = field(repr=False)
    samples: int


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    """ "Your model for `round` has not reached me": resend it if you still have it."""

    TYPE = "model_req"
    sender: str
    round: int


@dataclass(frozen=True, slots=True)
class Bye:
    """Clean shutdown notice: drop me now instead of waiting for heartbeats."""

    TYPE = "bye"
    sender: str
    round: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SecureEnvelope:
    """One secure-aggregation message (see `p2pfl.secure.group_messages`), `kind` naming it.

    The codec checks only the envelope; `p2pfl.secure.wire` validates the body into the
    typed secure message, as `UpdateDecoder` does for compressed blobs.
    """

    TYPE = "sa"
    sender: str
    round: int
    kind: str
    body: dict[str, Any] = field(repr=False)


Message = (
    Hello
    | Ping
    | Pong
    | PeerList
    | ModelUpdate
    | CompressedModelUpdate
    | StateRequest
    | StateReply
    | Bye
    | UpdateRequest
    | SecureEnvelope
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Ping,
        Pong,
        PeerList,
        ModelUpdate,
        CompressedModelUpdate,
        StateRequest,
        StateReply,
        Bye,
        UpdateRequest,
        SecureEnvelope,
    )
}
