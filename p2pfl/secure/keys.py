"""Per-session X25519 keys, announced under a signature of the node's Ed25519 identity.

Pairwise masks come from X25519 agreements between group members, and members are
often not connected to each other: the aggregator relays their keys. The signature is
what stops it (or anyone on the path) from substituting a key it holds the private
half of, which would let it strip that pair's masks. An announcement carries the
Ed25519 public key itself, so anyone can check it hashes to the claimed peer id and
that the signature covers (federation, peer id, epoch, X25519 key) under a domain tag.

Wire form (`KeyAnnouncement.to_bytes`, 137 bytes, peer id implied by the identity key):
    version(1) | ed25519 public(32) | x25519 public(32) | epoch u64 BE(8) | signature(64)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from p2pfl.identity import Identity, peer_id_from_public_key

ANNOUNCEMENT_VERSION = 1
ANNOUNCEMENT_LEN = 1 + 32 + 32 + 8 + 64
MAX_EPOCH = 2**64
_SIGN_DOMAIN = b"p2pfl/secure/x25519-announcement/v1\x00"


class KeyRejected(ValueError):
    """An announced key failed verification; `reason` is a short stable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _lp(data: bytes) -> bytes:
    """Length-prefixed field: keeps concatenated fields unambiguous."""
    return struct.pack(">I", len(data)) + data


def signed_message(federation: str, peer_id: str, epoch: int, x25519_public: bytes) -> bytes:
    """Exactly the bytes the identity key signs (domain-separated from every other use)."""
    return (
        _SIGN_DOMAIN
        + _lp(federation.encode())
        + _lp(peer_id.encode())
        + struct.pack(">Q", epoch)
        + _lp(x25519_public)
    )


@dataclass(frozen=True, slots=True)
class KeyAnnouncement:
    """A node's X25519 public key for one session, signed by its identity key."""

    identity_key: bytes
    x25519_key: bytes
    epoch: int
    signature: bytes

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.identity_key)

    def to_bytes(self) -> bytes:
        return (
            bytes((ANNOUNCEMENT_VERSION,))
            + self.identity_key
            + self.x25519_key
            + struct.pack(">Q", self.epoch)
            + self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAnnouncement:
        """Parse only (lengths, version); call `verify_announcement` before any use."""
        if len(data) != ANNOUNCEMENT_LEN:
            raise KeyRejected("malformed", f"{len(data)} bytes, expected {ANNOUNCEMENT_LEN}")
        if data[0] != ANNOUNCEMENT_VERSION:
            raise KeyRejected("malformed", f"unknown version {data[0]}")
        (epoch,) = struct.unpack(">Q", data[65:73])
        return cls(bytes(data[1:33]), bytes(data[33:65]), epoch, bytes(data[73:]))


def verify_announcement(
    announcement: KeyAnnouncement | bytes, federation: str, expected_peer: str | None = None
) -> KeyAnnouncement:
    """The announcement if it is genuine, else KeyRejected.

    Checks: well-formed; the identity key hashes to `expected_peer` (the id the sender
    claims or the transport authenticated); the Ed25519 signature covers this federation,
    peer id, epoch and X25519 key. A substituted X25519 key breaks the signature; a key
    re-signed by someone else carries their identity key, hence their peer id.
    """
    ann = (
        KeyAnnouncement.from_bytes(announcement)
        if isinstance(announcement, bytes | bytearray | memoryview)
        else announcement
    )
    if len(ann.identity_key) != 32 or len(ann.x25519_key) != 32 or len(ann.signature) != 64:
        raise KeyRejected("malformed", "wrong key or signature length")
    if not 0 <= ann.epoch < MAX_EPOCH:
        raise KeyRejected("malformed", "epoch out of range")
    peer = ann.peer_id
    if expected_peer is not None and peer != expected_peer:
        raise KeyRejected("wrong_peer", f"identity key is {peer}, expected {expected_peer}")
    try:
        public = Ed25519PublicKey.from_public_bytes(ann.identity_key)
        public.verify(ann.signature, signed_message(federation, peer, ann.epoch, ann.x25519_key))
    except (InvalidSignature, ValueError):
        raise KeyRejected("bad_signature", f"announcement of {peer}") from None
    return ann


class SessionKey:
    """This node's X25519 key pair for one session, with its signed announcement.

    A fresh key per process start (epoch: e.g. unix time in ms at creation, so it grows
    across restarts): nothing about it needs to survive, and pair seeds are bound to
    the round and attempt anyway, so one key serves a whole session.
    """

    __slots__ = ("_agreed", "_private", "announcement", "federation", "peer_id")
    MAX_CACHED = 4096

    def __init__(
        self,
        identity: Identity,
        federation: str,
        epoch: int,
        private: X25519PrivateKey | None = None,
    ) -> None:
        self._private = private if private is not None else X25519PrivateKey.generate()
        self._agreed: dict[bytes, bytes] = {}  # peer key -> shared secret: same every round
        x_pub = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.federation = federation
        self.peer_id = identity.peer_id
        signature = identity.sign(signed_message(federation, identity.peer_id, epoch, x_pub))
        self.announcement = KeyAnnouncement(identity.public_bytes, x_pub, epoch, signature)

    def __repr__(self) -> str:
        return f"SessionKey(peer_id={self.peer_id!r}, epoch={self.announcement.epoch})"

    @property
    def public_bytes(self) -> bytes:
        return self.announcement.x25519_key

    def agree(self, peer_x25519: bytes) -> bytes:
        """Raw X25519 shared secret; KeyRejected for a low-order (all-zero result) key.

        Cached per peer key: the secret never changes within a session (HKDF binds each
        use to its round and attempt), and neighbours meet every round.
        """
        cached = self._agreed.get(peer_x25519)
        if cached is not None:
            return cached
        try:
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(peer_x25519))
        except ValueError:
            raise KeyRejected("weak_key", "X25519 agreement gave the all-zero secret") from None
        if len(self._agreed) >= self.MAX_CACHED:
            self._agreed.clear()
        self._agreed[bytes(peer_x25519)] = secret
        return secret


class KeyStore:
    """Latest verified announcement per peer, as received directly from that peer.

    A higher epoch replaces the stored key (the peer restarted); an older one is stale;
    the same epoch with another key is equivocation. All three refusals raise KeyRejected.
    """

    def __init__(self, federation: str) -> None:
        self.federation = federation
        self._keys: dict[str, KeyAnnouncement] = {}

    def add(self, sender: str, announcement: KeyAnnouncement | bytes) -> KeyAnnouncement:
        ann = verify_announcement(announcement, self.federation, expected_peer=sender)
        old = self._keys.get(sender)
        if old is not None:
            if ann.epoch < old.epoch:
                raise KeyRejected("stale", f"epoch {ann.epoch} < {old.epoch}")
            if ann.epoch == old.epoch and ann != old:
                raise KeyRejected("equivocation", f"two keys for epoch {ann.epoch}")
        self._keys[sender] = ann
        return ann

    def get(self, peer: str) -> KeyAnnouncement | None:
        return self._keys.get(peer)

    def forget(self, peer: str) -> None:
        self._keys.pop(peer, None)

    def __contains__(self, peer: object) -> bool:
        return peer in self._keys

    def __len__(self) -> int:
        return len(self._keys)
