"""The one exception every decoding path raises."""

from __future__ import annotations


class WireError(Exception):
    """A frame or message from a peer was not acceptable.

    `reason` is a short stable code (used as a status counter key); the message says
    what exactly was wrong, for the log line.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message
