"""Fatal *local* conditions: the only failures that end the daemon, each with an exit code.

A peer or a message can never end the node (see `p2pfl.supervision`); these can, because
no amount of waiting fixes them and the operator has to act. Each message is one line
that names the path or address and says what to do. The CLI maps each class to its own
exit code (`p2pfl.cli.EXIT_CODES`, documented in docs/cli.md under "Exit codes").

Stdlib only: the supervisor and the CLI import this module.
"""

from __future__ import annotations


class FatalError(Exception):
    """A local condition the node cannot work around; `str()` is the one line to print."""


class CannotBind(FatalError):
    """The listen address cannot be bound (in use, not on this host, not permitted)."""


class DataDirInUse(FatalError):
    """Another running node holds the data dir's lock."""


class DataDirUnusable(FatalError):
    """The data dir (or a file in it) is unsafe or cannot be written: wrong owner or mode,
    read-only, not a directory, a planted symlink, a path too long for the control socket,
    an unusable identity key."""


class DiskFull(FatalError):
    """No space (or quota) left while writing the node's state."""


__all__ = ["CannotBind", "DataDirInUse", "DataDirUnusable", "DiskFull", "FatalError"]
