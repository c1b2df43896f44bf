"""Secure aggregation inside small groups of neighbours, compatible with robust rules.

Each aggregator splits its neighbours into deterministic groups of g >= 3; members add
pairwise masks (X25519 -> HKDF -> AES-256-CTR) to fixed-point updates in Z_2^32, so the
aggregator learns only each group's sum and applies its robust rule across group means.
See docs/secure-aggregation.md. Modules: shamir (checked secret sharing), keys (signed
X25519 announcements), masking (fixed point + masks), grouping, messages (payloads),
protocol (sans-IO state machines), simulate (in-process driver for tests/benchmarks).
"""

from p2pfl.secure.keys import KeyAnnouncement, KeyRejected, KeyStore, SessionKey
from p2pfl.secure.protocol import (
    AggregatorRound,
    Refused,
    SecureMember,
    SecureResult,
    SecureSettings,
    SecureStats,
    Send,
)

__all__ = [
    "AggregatorRound",
    "KeyAnnouncement",
    "KeyRejected",
    "KeyStore",
    "Refused",
    "SecureMember",
    "SecureResult",
    "SecureSettings",
    "SecureStats",
    "Send",
    "SessionKey",
]
