"""Readable one-line logs on stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("p2pfl")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
