"""Receiver side: one UpdateDecoder per node, holding each sender's public copy x_hat.

Every message names the round of the x_hat it is relative to (`base`, -1 for a
keyframe). A receiver whose copy of that sender is at another round (it missed a
message, joined late, or the sender restarted) cannot use the delta: it raises
WireError("missing_base"), keeps its state, and recovers at the sender's next
keyframe. A delta no newer than the copy (a late resend) is "stale", not a lost base.
State only changes after a message has been fully validated, so a bad
message never corrupts a copy.

A copy never goes back to an earlier round: a resent or late keyframe for an older
round (made for a peer that reconnected after the sender had moved on) is decoded but
not adopted, since the sender's next delta builds on its newer message.

Everything from the network is hostile; whatever the blob, `decode` raises only
WireError, with reason "bad_compression", "missing_base", "stale" or
"decompression_bomb".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from p2pfl.compression.frame import parse_header, read_body
from p2pfl.wire.errors import WireError
from p2pfl.wire.tensors import all_finite

F32 = npt.NDArray[np.float32]
REASONS = ("bad_compression", "missing_base", "decompression_bomb", "stale")


@dataclass(slots=True)
class _Copy:
    x_hat: F32  # read-only; replaced, never modified, so returned arrays stay valid
    round: int


class UpdateDecoder:
    """Rebuilds senders' models from compressed blobs; `dim` is the model size."""

    def __init__(self, dim: int, *, max_frame_size: int) -> None:
        if dim < 0 or max_frame_size < 1:
            raise ValueError(f"need dim >= 0 and max_frame_size >= 1, got {dim}, {max_frame_size}")
        self.dim = dim
        self.max_frame_size = max_frame_size
        self._copies: dict[str, _Copy] = {}

    def decode(self, sender: str, round: int, blob: object) -> np.ndarray:
        """`sender`'s x_hat after its message for `round` (dense, float32, read-only)."""
        try:
            return self._decode(sender, round, blob)
        except WireError:
            raise
        except Exception as exc:  # pragma: no cover - defence in depth, fuzzed to stay unused
            raise WireError(
                "bad_compression", f"internal decoder error {type(exc).__name__}: {exc}"
            ) from None

    def _decode(self, sender: str, round: int, blob: object) -> F32:
        if type(round) is not int:
            raise WireError("bad_compression", f"round must be an int, got {type(round).__name__}")
        header = parse_header(blob, dim=self.dim, round=round)
        copy = self._copies.get(sender)
        if not header.keyframe:
            if copy is None:
                raise WireError(
                    "missing_base", f"delta on round {header.base}, but no copy of this sender yet"
                )
            if copy.round != header.base and round <= copy.round:
                # A late delta (a resend, a duplicate) older than what we already have:
                # nothing is lost, its base is simply behind us.
                raise WireError(
                    "stale", f"delta for round {round}, our copy is already of round {copy.round}"
                )
            if copy.round != header.base:
                raise WireError(
                    "missing_base",
                    f"delta on round {header.base}, our copy is of round {copy.round}",
                )
        idx, values = read_body(header, dim=self.dim, limit=self.max_frame_size)
        if header.keyframe:
            new = values  # keyframes are dense: top-k needs delta
        else:
            assert copy is not None
            new = copy.x_hat.copy()
            if idx is None:
                new += values
            else:
                new[idx] += values
        if not all_finite(new):
            raise WireError("bad_compression", "the update makes the model overflow float32")
        new.setflags(write=False)
        if copy is None or round >= copy.round:
            self._copies[sender] = _Copy(new, round)
        return new

    def round_of(self, sender: str) -> int | None:
        """Round of our copy of `sender`, None if we have none."""
        copy = self._copies.get(sender)
        return None if copy is None else copy.round

    def forget(self, sender: str) -> None:
        """Drop `sender`'s copy (it disconnected; it will open with a keyframe)."""
        self._copies.pop(sender, None)
