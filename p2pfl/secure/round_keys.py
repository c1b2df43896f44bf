"""Per-round X25519 keys for secure aggregation v2, signed by the member's identity key.

Why per round (v1 used one key per session): a dropped member's pair masks are rebuilt
from Shamir shares of its key's *secret*. Rebuilding a session key would expose every
later round's masks; a round key exposes only the round that needed it. It also gives
forward secrecy per round: a key leaked later opens no recorded round.

The signature binds the key to federation, round, leader, session and the member's peer
id, so a leader cannot move a key to another group or round, and a mate checks it with
the identity key it authenticated over its own channel.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pfl.identity import Identity, peer_id_from_public_key
from p2pfl.secure.keys import KeyRejected, _lp
from p2pfl.secure.masking import MaskContext, derive_seed

_DOMAIN = b"p2pfl/secure/round-key/v2\x00"
_BOX_DOMAIN = b"p2pfl/secure/box/v2\x00"
KEY_LEN = 32
SIGNATURE_LEN = 64
NONCE_LEN = 12
BOX_OVERHEAD = NONCE_LEN + 16  # nonce + GCM tag


@dataclass(frozen=True, slots=True)
class RoundScope:
    """What a round key (and every pair seed from it) is bound to."""

    federation: str
    round: int
    leader: str
    session: bytes
    group: int

    def statement(self, peer_id: str, public: bytes) -> bytes:
        """Exactly the bytes a member's identity key signs for its round key."""
        return (
            _DOMAIN
            + _lp(self.federation.encode())
            + struct.pack(">QI", self.round, self.group)
            + _lp(self.leader.encode())
            + _lp(self.session)
            + _lp(peer_id.encode())
            + _lp(public)
        )

    def box_aad(self, origin: str, to: str, kind: str) -> bytes:
        """What a sealed mate-to-mate message is bound to: this group of this round, its
        direction and its kind (a relaying leader cannot turn a commit into an ack)."""
        return _box_prefix(self) + _lp(origin.encode()) + _lp(to.encode()) + _lp(kind.encode())

    def mask_context(self) -> MaskContext:
        return MaskContext(self.federation, self.round, self.leader, self.session, self.group, 0)


@lru_cache(maxsize=64)
def _box_prefix(scope: RoundScope) -> bytes:
    """The scope's part of every box's binding, built once per group (a member seals and
    opens about three boxes per mate)."""
    return (
        _BOX_DOMAIN
        + _lp(scope.federation.encode())
        + struct.pack(">QI", scope.round, scope.group)
        + _lp(scope.leader.encode())
        + _lp(scope.session)
    )


class RoundKey:
    """A member's fresh key pair for one (round, group), with its signature."""

    __slots__ = ("_private", "peer_id", "public", "scope", "signature")

    def __init__(self, identity: Identity, scope: RoundScope) -> None:
        self._private = X25519PrivateKey.generate()
        self.scope = scope
        self.peer_id = identity.peer_id
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.signature = identity.sign(scope.statement(identity.peer_id, self.public))

    def __repr__(self) -> str:  # never the secret
        return f"RoundKey(peer_id={self.peer_id!r}, round={self.scope.round})"

    def secret_bytes(self) -> bytes:
        """The 32-byte secret, only to be Shamir-shared among group mates."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def pair_seed(self, peer_id: str, peer_public: bytes) -> bytes:
        return _pair_seed(
            self._private, self.peer_id, self.public, peer_id, peer_public, self.scope
        )

    def pair_secrets(self, peer_id: str, peer_public: bytes) -> tuple[bytes, bytes]:
        """(mask seed, box key) shared with a mate: both from one X25519 agreement,
        through HKDF with distinct info, so the leader that relays our sealed messages
        learns neither."""
        seed = self.pair_seed(peer_id, peer_public)
        box = derive_seed(seed, _BOX_DOMAIN)
        return seed, box


def seal(key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """AES-256-GCM under a pair's box key, random nonce in front."""
    nonce = secrets.token_bytes(NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, aad: bytes, box: bytes) -> bytes:
    """The plaintext of `seal`, or KeyRejected if anyone changed a bit or the binding."""
    if len(box) < BOX_OVERHEAD:
        raise KeyRejected("malformed", "sealed message too short")
    try:
        return AESGCM(key).decrypt(box[:NONCE_LEN], box[NONCE_LEN:], aad)
    except InvalidTag:
        raise KeyRejected("bad_box", "sealed message does not open") from None


def verify_round_key(
    scope: RoundScope, peer_id: str, identity_key: bytes, public: bytes, signature: bytes
) -> None:
    """KeyRejected unless `identity_key` is `peer_id`'s and signed `public` for `scope`."""
    if len(public) != KEY_LEN or len(signature) != SIGNATURE_LEN or len(identity_key) != 32:
        raise KeyRejected("malformed", "wrong round key or signature length")
    if peer_id_from_public_key(identity_key) != peer_id:
        raise KeyRejected("wrong_peer", f"identity key is not {peer_id}'s")
    try:
        Ed25519PublicKey.from_public_bytes(identity_key).verify(
            signature, scope.statement(peer_id, public)
        )
    except (InvalidSignature, ValueError):
        raise KeyRejected("bad_signature", f"round key of {peer_id}") from None


def pair_seeds_from_secret(
    secret: bytes, my_id: str, my_public: bytes, peers: Mapping[str, bytes], scope: RoundScope
) -> dict[str, bytes]:
    """What a leader computes for a dropped member once it rebuilt that member's secret
    from shares: the seed it shared with each of `peers` (id -> round public key)."""
    private = X25519PrivateKey.from_private_bytes(secret)
    return {p: _pair_seed(private, my_id, my_public, p, key, scope) for p, key in peers.items()}


def _pair_seed(
    private: X25519PrivateKey,
    my_id: str,
    my_public: bytes,
    peer_id: str,
    peer_public: bytes,
    scope: RoundScope,
) -> bytes:
    """The seed two members share in `scope` (both sides compute the same)."""
    if peer_id == my_id:
        raise ValueError("no pair seed with oneself")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise KeyRejected("weak_key", "X25519 agreement failed") from None
    info = scope.mask_context().info(my_id, my_public, peer_id, peer_public)
    return derive_seed(shared, info)
