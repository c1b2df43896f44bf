"""The secure-aggregation state machines' refusal: one exception, one stable reason tag."""

from __future__ import annotations


class Refused(ValueError):
    """A state machine refused a message or a step; `reason` is a short stable tag
    (what the driver counts), `detail` only goes into the text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
