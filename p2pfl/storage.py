"""Atomic on-disk state: checkpoints survive a crash at any instant.

A checkpoint is written through `p2pfl.datadir.atomic_write`: a temp file with a random
name in the same directory (never a planted symlink), fsynced, renamed over the old one
(atomic on POSIX) and the directory fsynced. A crash before the rename leaves the previous
checkpoint intact; after it, the new one is complete. A full disk raises `DiskFull`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from p2pfl.datadir import atomic_write, read_file
from p2pfl.wire.errors import WireError
from p2pfl.wire.tensors import decode_tensor, encode_tensor

log = logging.getLogger("p2pfl.storage")

CHECKPOINT_FORMAT = 1

__all__ = ["Checkpoint", "CheckpointError", "atomic_write", "load_checkpoint", "save_checkpoint"]


class CheckpointError(Exception):
    pass


@dataclass
class Checkpoint:
    round: int
    params: np.ndarray
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    # Sender-side compression state (public copy x_hat, error-feedback residual).
    compression: dict[str, np.ndarray] = field(default_factory=dict)
    # The outer optimizer's moments and step (`p2pfl.learning.outer`); absent from
    # checkpoints written before it existed, which load with none (a fresh optimizer).
    outer: dict[str, np.ndarray] = field(default_factory=dict)
    # The personal model beside the shared one (`p2pfl.learning.personal`); likewise
    # absent from older checkpoints (the personal model then starts from the shared one).
    personal: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    doc = {
        "format": CHECKPOINT_FORMAT,
        "round": ckpt.round,
        "model": ckpt.model,
        "params": encode_tensor(ckpt.params),
        "optimizer": {k: encode_tensor(v) for k, v in ckpt.optimizer.items()},
        "history": ckpt.history,
        "compression": {k: encode_tensor(v) for k, v in ckpt.compression.items()},
        "outer": {k: encode_tensor(v) for k, v in ckpt.outer.items()},
        "personal": {k: encode_tensor(v) for k, v in ckpt.personal.items()},
    }
    atomic_write(path, msgpack.packb(doc, use_bin_type=True))


def load_checkpoint(path: Path) -> Checkpoint | None:
    """Return the checkpoint at `path`, None if there is none, CheckpointError if corrupt."""
    raw = read_file(path)  # never through a symlink; DataDirUnusable if unreadable
    if raw is None:
        return None
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format")
        params = decode_tensor(doc["params"]).astype(np.float32)
        optimizer = {str(k): decode_tensor(v).copy() for k, v in doc["optimizer"].items()}
        rnd = doc["round"]
        if not isinstance(rnd, int) or rnd < 0:
            raise CheckpointError(f"{path}: bad round {rnd!r}")
        compression = {
            str(k): decode_tensor(v).copy() for k, v in doc.get("compression", {}).items()
        }
        outer = {str(k): decode_tensor(v).copy() for k, v in doc.get("outer", {}).items()}
        personal = {str(k): decode_tensor(v).copy() for k, v in doc.get("personal", {}).items()}
        return Checkpoint(
            rnd,
            params.copy(),
            optimizer,
            list(doc["history"]),
            str(doc["model"]),
            compression,
            outer,
            personal,
        )
    except CheckpointError:
        raise
    except (WireError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from None
