"""`p2pfl status --offline`: what a stopped node left in its data dir, shaped like the
live status (the same renderer and `--json` shape, with `node.state = "stopped"`).

Why: an operator looking at a node that crashed or finished has no control socket to
ask; its identity key, checkpoint and `metrics.jsonl` still say who it was, how far it
got and how its model did. Read-only and never through symlinks (the same readers the
node uses); a corrupt file is reported in the status, not raised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HISTORY_ROWS = 200  # the last metrics rows shown (the live node keeps about as many)


def offline_status(data_dir: Path) -> dict[str, Any]:
    """A status dict for the node whose data dir is `data_dir` (ValueError if it is not
    one: no identity key, checkpoint or metrics)."""
    from p2pfl.identity import IdentityError, load_identity
    from p2pfl.node.learner import CHECKPOINT_FILE, METRICS_FILE
    from p2pfl.storage import CheckpointError, load_checkpoint

    data_dir = Path(data_dir).expanduser()
    problems: list[str] = []
    node_id = None
    try:
        ident = load_identity(data_dir)
        node_id = None if ident is None else ident.peer_id
    except IdentityError as exc:
        problems.append(str(exc))
    rows = _metrics_rows(data_dir / METRICS_FILE, problems)
    ckpt = None
    try:
        ckpt = load_checkpoint(data_dir / CHECKPOINT_FILE)
    except (CheckpointError, OSError, ValueError) as exc:
        problems.append(f"checkpoint: {exc}")
    if node_id is None and ckpt is None and not rows:
        raise ValueError(f"{data_dir} holds no p2pfl node (no identity key, checkpoint or metrics)")
    last_round = rows[-1].get("round") if rows else None
    stopped = _mtime(data_dir / METRICS_FILE) or _mtime(data_dir / CHECKPOINT_FILE)
    return {
        "node": {"id": node_id, "data_dir": str(data_dir), "state": "stopped",
                 "stopped_at_unix": stopped, "problems": problems},
        "round": {
            "current": ckpt.round if ckpt is not None else last_round,
            "phase": "stopped",
            "checkpoint": None if ckpt is None else ckpt.round,
            "last_metrics_round": last_round,
        },
        "model": {} if ckpt is None else {"params": int(ckpt.params.size),
                                          "version": ckpt.round},
        "history": rows[-HISTORY_ROWS:],
        "peers": [],
    }  # fmt: skip


def _metrics_rows(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        problems.append(f"{path}: {exc.strerror}")
        return []
    rows, bad = [], 0
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1  # a line cut by a crash: skip it
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        problems.append(f"{path}: {bad} unreadable line(s) skipped")
    return rows


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None
