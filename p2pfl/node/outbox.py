"""What each neighbour receives of our model for a round (sans-IO).

Plain float32 updates, or compressed ones: one encoder for everyone while every
neighbour gets every update (neighbours = "all"), one per peer when neighbours vary per
round, so a peer never gets a delta whose base it missed. The payloads of the last
rounds are kept so a neighbour whose copy was lost can ask for it again.

A peer that (re)connects after we sent a round's model (a restarted node that caught
up to that round) can ask for it too: it gets a payload made for it then, a plain
update or a compressed keyframe, which needs no base. Each round goes out once: a
second request to send a round already sent returns the same payloads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from p2pfl.compression import Pipeline, UpdateEncoder
from p2pfl.wire import codec
from p2pfl.wire.messages import CompressedModelUpdate, ModelUpdate

log = logging.getLogger("p2pfl.node")

RESEND_ROUNDS = 2  # past rounds whose payloads are kept for resend requests


@dataclass(frozen=True, slots=True, eq=False)
class PlainUpdate:
    """A plain update encoded ahead of `payloads` (off the event loop)."""

    round: int
    payload: bytes
    params: np.ndarray  # our own copy, for resends


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
        self._models: dict[int, tuple[np.ndarray, int]] = {}  # round -> (params, samples)
        self._instead: dict[int, Mapping[str, np.ndarray]] = {}  # round -> peer -> params
        self._last_round = -1  # the last round sent
        self._joined: dict[str, int] = {}  # peer -> the last round sent before it connected
        self.last_sizes: tuple[int, int] = (0, 0)  # (float32 bytes, wire bytes)

    @property
    def compressing(self) -> bool:
        return self.pipeline is not None

    def encode_plain(self, round: int, params: np.ndarray, samples: int) -> PlainUpdate:
        """A plain update's bytes and the copy kept for resends: pure, so a real node
        runs it in a worker thread and hands the result to `payloads(prepared=...)`."""
        payload = codec.encode(ModelUpdate(self.node_id, round, params, samples))
        return PlainUpdate(round, payload, params.copy())

    def payloads(
        self,
        round: int,
        params: np.ndarray,
        samples: int,
        peers: Sequence[str],
        *,
        prepared: PlainUpdate | None = None,
        instead: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, bytes]:
        """Encode our model for `round` for each of `peers` (shared bytes where possible).

        A round is encoded once: a compressed stream has one message per round, and a
        peer must not get two different models for one round. Asked again for a round
        already sent (a bug upstream), we log it and give what was sent then.

        `instead` gives some peers another model than `params` (a study attacker's
        `honest_to` neighbours); only such a node passes it, so everyone else keeps the
        one-payload-for-all path. Compressed, it needs per-peer streams (`per_peer`).
        """
        if round <= self._last_round:
            log.warning(
                "round %d: our model was already sent (last sent: round %d); not re-encoding",
                round,
                self._last_round,
            )
            again = {peer: self.resend(peer, round) for peer in peers}
            return {peer: payload for peer, payload in again.items() if payload is not None}
        out: dict[str, bytes] = {}
        kept: np.ndarray | None = None
        try:
            if prepared is not None:
                if self.pipeline is not None or prepared.round != round or instead:
                    raise RuntimeError("a prepared plain update for another round or stream")
                out = dict.fromkeys(peers, prepared.payload)
                kept = prepared.params
                self.last_sizes = (4 * params.size, len(prepared.payload))
            elif not self.per_peer:
                payload = self._encode(self._shared, round, params, samples)
                out = dict.fromkeys(peers, payload)
                if instead:
                    if self.pipeline is not None:
                        raise RuntimeError("per-peer models need per-peer compression streams")
                    other: dict[int, bytes] = {}  # one encoding per distinct model
                    for peer in (p for p in peers if p in instead):
                        model = instead[peer]
                        if id(model) not in other:
                            other[id(model)] = self._encode(None, round, model, samples)
                        out[peer] = other[id(model)]
            else:
                for peer in peers:
                    encoder = self._peers.get(peer) or self._encoder()
                    self._peers[peer] = encoder  # type: ignore[assignment]
                    model = instead.get(peer, params) if instead else params
                    out[peer] = self._encode(encoder, round, model, samples)
        except ValueError as exc:
            # Our own model cannot be encoded (non-finite, overflowing, wrong size): a
            # local fault, never a reason to end the node. Nothing goes out this round;
            # whoever got a stream message meanwhile restarts from a keyframe.
            log.warning("round %d: cannot encode our model (%s); not sending it", round, exc)
            for peer in peers:
                self.dropped(peer)
            return {}
        self._sent[round] = out
        self._models[round] = (params.copy() if kept is None else kept, samples)
        if instead:
            copies: dict[int, np.ndarray] = {}  # kept for resends, one copy per model
            for model in instead.values():
                if id(model) not in copies:
                    copies[id(model)] = model.copy()
            self._instead[round] = {peer: copies[id(m)] for peer, m in instead.items()}
        self._last_round = round
        for old in [r for r in self._sent if r < round - RESEND_ROUNDS]:
            del self._sent[old]
            self._models.pop(old, None)
            self._instead.pop(old, None)
        for p in [p for p, r in self._joined.items() if r < round - RESEND_ROUNDS]:
            del self._joined[p]
        return out

    def resend(self, peer: str, round: int) -> bytes | None:
        """The payload `peer` got (or should have got) for `round`, if still kept.

        A peer that connected only after `round` was sent gets one made for it now:
        it may have caught up to that round, and without it would wait a timeout.
        A peer left out on purpose (k random neighbours) gets nothing.
        """
        sent = self._sent.get(round, {})
        if peer in sent:
            return sent[peer]
        kept = self._models.get(round)
        if kept is None or round > self._joined.get(peer, -1):
            return None
        params, samples = kept
        params = self._instead.get(round, {}).get(peer, params)
        try:
            payload = self._late_payload(peer, round, params, samples)
        except ValueError as exc:  # pragma: no cover - it was encoded once already
            log.warning("round %d: cannot encode our model for %s (%s)", round, peer[:12], exc)
            return None
        sent[peer] = payload
        return payload

    def dropped(self, peer: str) -> None:
        """A payload never left for `peer`: its copy of our model lacks that base."""
        encoder = self._peers.get(peer) if self.per_peer else self._shared
        if encoder is not None:
            encoder.force_keyframe()

    def peer_connected(self, peer: str) -> None:
        """A (re)connected peer has no copy of our model: start it with a keyframe.

        Payloads made for its previous connection may be deltas on a copy it no longer
        has: forget them; rounds sent before now are made afresh if it asks.
        """
        self._peers.pop(peer, None)
        if self._shared is not None:
            self._shared.force_keyframe()
        for sent in self._sent.values():
            sent.pop(peer, None)
        self._joined[peer] = self._last_round

    def _late_payload(self, peer: str, round: int, params: np.ndarray, samples: int) -> bytes:
        """Our model for `round`, for a peer that was not connected when it went out."""
        if self.pipeline is None:
            return codec.encode(ModelUpdate(self.node_id, round, params, samples))
        # A keyframe of its own: it needs no base and leaves the stream the others
        # decode untouched (a receiver never rewinds its copy to an older keyframe).
        late = UpdateEncoder(self.pipeline, keyframe_every=0, seed=self._seed)
        blob = late.encode(params, round)
        if peer in self._peers:
            self._peers[peer].force_keyframe()  # its own stream goes on from a keyframe
        return codec.encode(CompressedModelUpdate(self.node_id, round, blob, samples))

    def public_copy(self) -> np.ndarray | None:
        """Our public copy x_hat: what every neighbour has rebuilt of our model from our
        messages (after a round that could not go out, still the previous one's). The
        consensus step's reference; None without one shared compressed stream (plain
        updates, per-peer streams) or before our first message."""
        return None if self.per_peer or self._shared is None else self._shared.x_hat

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
            return
        self._last_round = self._shared.last_round

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
