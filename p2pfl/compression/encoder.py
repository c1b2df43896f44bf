"""Sender side: one UpdateEncoder per node, shared by all the peers it broadcasts to.

A node sends the same message to every neighbour, and in a sparse topology its
neighbours hold different models, so a delta cannot be taken against "the receiver's
model". Instead (CHOCO-SGD style) the sender keeps a public copy x_hat: exactly the
model every receiver has rebuilt from its messages so far. Each round it sends
C(params - x_hat) and adds the decoded message to x_hat, as every receiver does.

Error feedback falls out of this: what compression dropped this round is still in
params - x_hat next round and gets another chance, so nothing is lost, only delayed.
`residual` = params - x_hat after the last message is that carried error (saved in the
checkpoint with x_hat). With `topk:F:noef` the sender instead compresses the true
change of its model since the last message and never resends what was dropped; the
residual then only grows (kept for accounting and for the EF-vs-no-EF comparison).

A keyframe (base -1) is the full model through the lossy stages but without delta
and top-k: it resets x_hat for everybody. One goes out on the first message, every
`keyframe_every` rounds, and after `force_keyframe()` (a new or reconnected peer has
no x_hat of ours). A pipeline without `delta` sends only keyframes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from p2pfl.compression.entropy import compressor
from p2pfl.compression.frame import flags, make_blob
from p2pfl.compression.pipeline import Pipeline
from p2pfl.compression.quantize import encode_values
from p2pfl.compression.sparse import encode_indices, top_k

F32 = npt.NDArray[np.float32]
STATE_KEYS = frozenset({"x_hat", "residual", "rounds"})


class UpdateEncoder:
    """Turns this node's model for a round into a compressed, self-describing blob."""

    def __init__(self, pipeline: Pipeline, *, keyframe_every: int = 10, seed: int = 0) -> None:
        if keyframe_every < 0:
            raise ValueError(
                f"keyframe_every must be >= 0 (0 = only when needed), got {keyframe_every}"
            )
        self.pipeline = pipeline
        self.keyframe_every = keyframe_every
        self._rng = np.random.default_rng([seed, 0xC0DEC])
        self._zstd = compressor(pipeline.zstd.level) if pipeline.zstd is not None else None
        self._x_hat: F32 | None = None
        self._residual: F32 | None = None
        self._base_round = -1  # round of the last message (the base of the next delta)
        self._keyframe_round = -1
        self._force = False
        self.raw_bytes = 0  # float32 size of the last encoded model
        self.wire_bytes = 0  # msgpack size of the last blob
        self.last_was_keyframe = False

    # ---- encoding ----------------------------------------------------------------------

    def force_keyframe(self) -> None:
        """Make the next message a keyframe (a peer appeared that has no x_hat of ours)."""
        self._force = True

    def _wants_keyframe(self, round: int) -> bool:
        return (
            not self.pipeline.delta
            or self._x_hat is None
            or self._force
            or (self.keyframe_every > 0 and round - self._keyframe_round >= self.keyframe_every)
        )

    def encode(self, params: np.ndarray, round: int) -> dict[str, Any]:
        """Compress `params` (this node's model for `round`) and advance x_hat and residual.

        ValueError for a local bug: wrong dtype/shape, non-finite values, or a round not
        after the previous message's.
        """
        p = self._check(params)
        if round <= self._base_round:
            raise ValueError(
                f"round {round} is not after the last encoded round {self._base_round}"
            )
        keyframe = self._wants_keyframe(round)
        if keyframe:
            u = p
        else:
            assert self._x_hat is not None and self._residual is not None
            u = p - self._x_hat
            if self.pipeline.topk is not None and not self.pipeline.topk.error_feedback:
                u -= self._residual  # = p - (last params): the true change only
        idx = None
        if not keyframe and self.pipeline.topk is not None:
            idx = top_k(u, self.pipeline.topk.count(u.size))
            u = u[idx]
        value_bytes, sent = encode_values(u, self.pipeline.quantize, self._rng)
        if keyframe:
            x_hat = sent
        else:
            assert self._x_hat is not None
            x_hat = self._x_hat.copy()
            if idx is None:
                x_hat += sent
            else:
                x_hat[idx] += sent
        if not np.isfinite(x_hat).all():
            raise ValueError("compressed update overflows float32 (diverged model?)")
        index_bytes = encode_indices(idx, p.size) if idx is not None else b""
        body = index_bytes + value_bytes
        data, zipped = body, False
        if self._zstd is not None:
            # Only when it pays: on a small sparse body the frame header and entropy
            # tables cost more than they save. The flags tell the receiver which.
            packed = self._zstd.compress(body)
            if len(packed) < len(body):
                data, zipped = packed, True
        blob = make_blob(
            flags(self.pipeline, keyframe=keyframe, zstd=zipped),
            -1 if keyframe else self._base_round,
            p.size,
            int(u.size),
            data,
        )
        self._x_hat = x_hat
        self._residual = p - x_hat
        self._base_round = round
        if keyframe:
            self._keyframe_round = round
            self._force = False
        self.last_was_keyframe = keyframe
        self.raw_bytes = 4 * p.size
        self.wire_bytes = len(msgpack.packb(blob, use_bin_type=True))
        return blob

    def _check(self, params: np.ndarray) -> F32:
        if not isinstance(params, np.ndarray) or params.dtype != np.float32 or params.ndim != 1:
            raise ValueError("params must be a 1-D float32 array")
        if self._x_hat is not None and params.shape != self._x_hat.shape:
            raise ValueError(
                f"params has {params.size} values, earlier messages had {self._x_hat.size}"
            )
        if not np.isfinite(params).all():
            raise ValueError("params contain NaN or infinity")
        return np.ascontiguousarray(params)

    # ---- public copy and checkpoint state ------------------------------------------------

    @property
    def x_hat(self) -> F32 | None:
        """What every receiver holds for us after our last message (a copy)."""
        return None if self._x_hat is None else self._x_hat.copy()

    @property
    def last_round(self) -> int:
        """Round of the last message (-1 if none): the next must be for a later round."""
        return self._base_round

    @property
    def residual(self) -> F32 | None:
        return None if self._residual is None else self._residual.copy()

    def state(self) -> dict[str, np.ndarray]:
        """x_hat, residual and [base round, keyframe round] for the checkpoint ({} if unused)."""
        if self._x_hat is None or self._residual is None:
            return {}
        rounds = np.array([self._base_round, self._keyframe_round], dtype=np.int32)
        return {"x_hat": self._x_hat.copy(), "residual": self._residual.copy(), "rounds": rounds}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore `state()`; ValueError (and no change) if it is inconsistent."""
        if not state:
            self._x_hat = self._residual = None
            self._base_round = self._keyframe_round = -1
            return
        if set(state) != STATE_KEYS:
            raise ValueError(
                f"encoder state keys must be {sorted(STATE_KEYS)}, got {sorted(state)}"
            )
        x_hat = np.asarray(state["x_hat"])
        residual = np.asarray(state["residual"])
        rounds = np.asarray(state["rounds"])
        for name, a in (("x_hat", x_hat), ("residual", residual)):
            if a.dtype != np.float32 or a.ndim != 1 or not np.isfinite(a).all():
                raise ValueError(f"encoder state {name!r} must be a finite 1-D float32 array")
        if x_hat.shape != residual.shape:
            raise ValueError("encoder state 'x_hat' and 'residual' differ in length")
        if rounds.shape != (2,) or rounds.dtype.kind != "i":
            raise ValueError("encoder state 'rounds' must be two integers")
        base, key = int(rounds[0]), int(rounds[1])
        if not 0 <= key <= base:
            raise ValueError(f"encoder state rounds out of order: base {base}, keyframe {key}")
        self._x_hat = x_hat.copy()
        self._residual = residual.copy()
        self._base_round, self._keyframe_round = base, key
