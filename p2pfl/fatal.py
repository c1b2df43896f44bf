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


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or [exc]."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in exception_leaves(sub)]
    return [exc]


def bind_error(exc: BaseException, listen: str) -> CannotBind | None:
    """A failure to listen, as the one CannotBind line that says what to do (None if
    `exc` is not about binding); the CLI and the Python API word it alike."""
    import errno
    import socket

    leaves = exception_leaves(exc)
    if any(isinstance(leaf, FatalError) for leaf in leaves):
        return None  # already says what it is
    for leaf in leaves:
        if not isinstance(leaf, OSError):
            continue
        if isinstance(leaf, socket.gaierror):
            hint = "use an IP address (or a name this host resolves) in --listen"
        elif leaf.errno == errno.EADDRINUSE:
            hint = (
                "another program (maybe another p2pfl node) has this port: stop it, or choose "
                "another port with --listen HOST:PORT (port 0 picks a free one)"
            )
        elif leaf.errno == errno.EADDRNOTAVAIL:
            hint = "the address is not on this host: use one of its addresses in --listen"
        elif leaf.errno in (errno.EACCES, errno.EPERM):
            hint = "ports below 1024 need privileges: use a higher port in --listen"
        else:
            hint = "check the --listen address"
        reason = (leaf.strerror or str(leaf)).lower()
        if reason.startswith("address already in use"):
            reason = "address already in use"
        return CannotBind(f"cannot listen on {listen}: {reason}; {hint}")
    return None


__all__ = [
    "CannotBind",
    "DataDirInUse",
    "DataDirUnusable",
    "DiskFull",
    "FatalError",
    "bind_error",
    "exception_leaves",
]
