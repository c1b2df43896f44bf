"""What the secure-aggregation key checks share: their refusal and a length prefix.

The keys themselves are per round (`round_keys.py`: X25519 round keys signed by the
member's Ed25519 identity key, sealed mate-to-mate messages) and the membership proofs
are in `admission.py`; both refuse with `KeyRejected` and build what they sign or bind
from `_lp` fields.
"""

from __future__ import annotations

import struct


class KeyRejected(ValueError):
    """A key, signature, proof or sealed message failed verification; `reason` is a
    short stable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _lp(data: bytes) -> bytes:
    """Length-prefixed field: keeps concatenated fields unambiguous."""
    return struct.pack(">I", len(data)) + data
