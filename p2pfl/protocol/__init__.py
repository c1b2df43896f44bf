"""Sans-IO round protocol."""

from p2pfl.protocol.actions import (
    Action,
    Aggregate,
    Aggregated,
    Broadcast,
    CaughtUp,
    Finished,
    Rejected,
    RequestState,
    RequestUpdates,
    Train,
)
from p2pfl.protocol.gossip import GossipMachine, GossipSettings
from p2pfl.protocol.rounds import Phase, RoundMachine, RoundSettings

__all__ = [
    "Action",
    "Aggregate",
    "Aggregated",
    "Broadcast",
    "CaughtUp",
    "Finished",
    "GossipMachine",
    "GossipSettings",
    "Phase",
    "Rejected",
    "RequestState",
    "RequestUpdates",
    "RoundMachine",
    "RoundSettings",
    "Train",
]
