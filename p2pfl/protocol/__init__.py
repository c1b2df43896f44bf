"""Sans-IO round protocol."""

from p2pfl.protocol.rounds import (
    Action,
    Aggregate,
    Aggregated,
    Broadcast,
    CaughtUp,
    Finished,
    Phase,
    Rejected,
    RequestState,
    RequestUpdates,
    RoundMachine,
    RoundSettings,
    Train,
)

__all__ = [
    "Action",
    "Aggregate",
    "Aggregated",
    "Broadcast",
    "CaughtUp",
    "Finished",
    "Phase",
    "Rejected",
    "RequestState",
    "RequestUpdates",
    "RoundMachine",
    "RoundSettings",
    "Train",
]
