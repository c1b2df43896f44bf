"""What each neighbour receives of our model for a round (sans-IO).

Plain float32 updates, or compressed ones: one encoder for everyone while every
neighbour gets every update (neighbours = "all"), one per peer when neighbours vary per
round, so a peer never gets a delta whose base it missed. The payloads of the last
rounds are kept so a neighbour whose copy was lost can ask for it again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from p2pfl.compression import Pipeline, UpdateEncoder
from p2pfl.wire import codec
from p2pfl.wire.messages import CompressedModelUpdate, ModelUpdate

log = logging.getLogger("p2pfl.node")

RESEND_ROUNDS = 2  # past rounds whose payloads are kept for resend requests


class UpdateOutbox:
    def __init__(
        self,
        node_id: str,
        pipeline: Pipeline | None,
        *,
        per_peer: bool,
        keyframe_every: int = 10,
        seed: int = 0,
    ) -> None:
        self.node_id = node_id
        self.pipeline = pipeline
        self.per_peer = per_peer and pipeline is not None
        self._keyframe_every = keyframe_every
        self._seed = seed
        self._shared = self._encoder()
        self._peers: dict[str, UpdateEncoder] = {}
        self._sent: dict[int, dict[str, bytes]] = {}
        self.last_sizes: tuple[int, int] = (0, 0)  # (float32 bytes, wire bytes)

    @property
    def compressing(self) -> bool:
        return self.pipeline is not None

    def payloads(
        self, round: int, params: np.ndarray, samples: int, peers: Sequence[str]
    ) -> dict[str, bytes]:
        """Encode our model for `round` for each of `peers` (shared bytes where possible)."""
        out: dict[str, bytes] = {}
        if not self.per_peer:
            payload = self._encode(self._shared, round, params, samples)
            out = dict.fromkeys(peers, payload)
        else:
            for peer in peers:
                encoder = self._peers.get(peer) or self._encoder()
                self._peers[peer] = encoder  # type: ignore[assignment]
                out[peer] = self._encode(encoder, round, params, samples)
        self._sent[round] = out
        for old in [r for r in self._sent if r < round - RESEND_ROUNDS]:
            del self._sent[old]
        return out

    def resend(self, peer: str, round: int) -> bytes | None:
        """The payload `peer` got (or should have got) for `round`, if still kept."""
        return self._sent.get(round, {}).get(peer)

    def dropped(self, peer: str) -> None:
        """A payload never left for `peer`: its copy of our model lacks that base."""
        encoder = self._peers.get(peer) if self.per_peer else self._shared
        if encoder is not None:
            encoder.force_keyframe()

    def peer_connected(self, peer: str) -> None:
        """A (re)connected peer has no copy of our model: start it with a keyframe."""
        self._peers.pop(peer, None)
        if self._shared is not None:
            self._shared.force_keyframe()

    def state(self) -> dict[str, np.ndarray]:
        return self._shared.state() if self._shared is not None else {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self._shared is None or not state:
            return
        try:
            self._shared.load_state(state)
        except ValueError as exc:
            log.warning("ignoring saved compression state (%s); starting fresh", exc)
            self._shared = self._encoder()

    def _encoder(self) -> UpdateEncoder | None:
        if self.pipeline is None:
            return None
        return UpdateEncoder(self.pipeline, keyframe_every=self._keyframe_every, seed=self._seed)

    def _encode(
        self, encoder: UpdateEncoder | None, round: int, params: np.ndarray, samples: int
    ) -> bytes:
        if encoder is None:
            payload = codec.encode(ModelUpdate(self.node_id, round, params, samples))
        else:
            blob = encoder.encode(params, round)
            payload = codec.encode(CompressedModelUpdate(self.node_id, round, blob, samples))
        self.last_sizes = (4 * params.size, len(payload))
        return payload
