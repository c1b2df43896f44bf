"""Who a member accepts as a group mate it is not directly connected to.

A mate reached through the leader (docs/secure-aggregation.md, "Relay") never went
through our TLS handshake, so it must show what the handshake would have checked: an
identity key whose hash is its peer id, and a membership proof, the federation CA's
signature over that key (the same CA that signs node certificates: derived from the
federation name and, if any, its secret). Then our allow list, if we have one.

What this is worth depends on the federation, exactly as for a TLS peer. With a
secret, only members can make a proof, so identities a leader mints are refused
(issue 14, reproduction 1). In an open federation anyone can make one: a minted mate
is then a Sybil, no stronger than one that connects. `mates = "auto"` therefore relays
only in federations with a secret or an allow list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature

from p2pfl.identity import Identity, peer_id_from_public_key
from p2pfl.secure.keys import KeyRejected
from p2pfl.transport.tls import federation_ca

_DOMAIN = b"p2pfl/secure/membership/v2\x00"
PROOF_LEN = 64


@dataclass(frozen=True, slots=True)
class Admission:
    """The federation's CA key (to check proofs and make ours) and the allow list."""

    federation: str
    secret: bytes | None = field(default=None, repr=False)
    allow: frozenset[str] | None = None

    @property
    def closed(self) -> bool:
        """A proof or the allow list means something only with a secret or a list."""
        return self.secret is not None or self.allow is not None

    def prove(self, identity: Identity) -> bytes:
        """Our membership proof (every member can make its own from the CA seed)."""
        return federation_ca(self.federation, self.secret).key.sign(_DOMAIN + identity.public_bytes)

    def check(self, peer_id: str, identity_key: bytes, proof: bytes) -> None:
        """KeyRejected unless `peer_id` is this key's, the CA signed it, and we allow it."""
        try:
            owner = peer_id_from_public_key(identity_key)
        except ValueError:
            raise KeyRejected("malformed", "identity key") from None
        if owner != peer_id:
            raise KeyRejected("wrong_peer", f"identity key is not {peer_id[:12]}'s")
        ca = federation_ca(self.federation, self.secret).key.public_key()
        try:
            ca.verify(proof, _DOMAIN + identity_key)
        except (InvalidSignature, ValueError):
            raise KeyRejected("not_a_member", f"{peer_id[:12]} has no membership proof") from None
        if self.allow is not None and peer_id not in self.allow:
            raise KeyRejected("not_allowed", f"{peer_id[:12]} is not on the allow list")
