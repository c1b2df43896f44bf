"""Secure aggregation: each update enters one masked group sum per round.

Every round a schedule no node controls picks leaders among neighbours; each node joins
one group, masks its fixed-point update with pairwise masks (per-round X25519 keys
signed by its identity key) and a self mask, deals Shamir shares of both to its mates,
and the leader learns only the group's mean, which members forward to their neighbours
for the robust rule. Modules: schedule (leaders, partition), round_keys (round keys,
pair seeds, sealed mate-to-mate boxes), admission (membership proofs), shamir,
masking (fixed point + mask streams), group_messages and wire (payloads and their
wire checks), group_member / group_leader (sans-IO state machines), group_driver (one
node across rounds), participant (what the node drives: neighbour keys, one outcome
per round, the no-group policy), errors and keys (the refusals). See
docs/secure-aggregation.md.
"""

from p2pfl.secure.admission import Admission
from p2pfl.secure.errors import Refused
from p2pfl.secure.group_leader import LeaderSettings
from p2pfl.secure.group_member import MemberPolicy
from p2pfl.secure.keys import KeyRejected
from p2pfl.secure.participant import Outcome, SecureParticipant

__all__ = [
    "Admission",
    "KeyRejected",
    "LeaderSettings",
    "MemberPolicy",
    "Outcome",
    "Refused",
    "SecureParticipant",
]
