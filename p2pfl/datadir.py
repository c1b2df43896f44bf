"""The node's data dir: checked, locked, and written only in ways a planted file cannot subvert.

Everything the node keeps on disk goes through this module, so one set of rules covers it all:

- The dir must be a directory owned by this user and writable by nobody else; otherwise
  another user could plant or swap files in it (a symlink where the checkpoint goes, their
  own identity key). It is refused, with the command that fixes it, before it is used.
- One running node per dir: an exclusive `flock` on `<dir>/lock`, held for the node's life.
  The kernel drops it when the process dies, so a crash never leaves a stale lock behind.
- Files are replaced atomically: a temp file with an unpredictable name, created with
  O_EXCL|O_NOFOLLOW (`tempfile.mkstemp`) in the same dir, is fsynced and renamed over the
  target (rename replaces a symlink, it never writes through one), then the dir is fsynced.
- Append-only logs are opened with O_APPEND|O_NOFOLLOW and written one line per write().
- An OSError becomes a `FatalError` whose message is one line saying what to do:
  ENOSPC/EDQUOT -> DiskFull, EROFS/EACCES/ELOOP/... -> DataDirUnusable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from types import TracebackType

from p2pfl.control import socket_path_too_long
from p2pfl.fatal import DataDirInUse, DataDirUnusable, DiskFull, FatalError

LOCK_FILE = "lock"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SYMLINK_ERRNOS = (errno.ELOOP, errno.EMLINK)  # O_NOFOLLOW on a link: Linux / the BSDs


# ---- checks (nothing is created) --------------------------------------------------------


def check_dir(path: Path) -> bool:
    """Refuse an existing data dir that others could tamper with; False if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise os_error(exc, path, "use data dir") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataDirUnusable(f"data dir {path} is not a directory: choose another --data-dir")
    check_private(path, st, what="data dir", mode="700")
    return True


def check_private(path: Path, st: os.stat_result, *, what: str, mode: str) -> None:
    """`path` (already stat-ed) must be ours and writable by nobody else."""
    uid = os.geteuid()
    if st.st_uid != uid:
        raise DataDirUnusable(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {uid}): "
            f"run `chown {uid} {path}` (as root), or use another --data-dir"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DataDirUnusable(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
            f"run `chmod {mode} {path}`"
        )


def check_socket_path(path: Path) -> None:
    """A control socket at `path` must fit in a unix socket address (checked before mkdir)."""
    problem = socket_path_too_long(path)
    if problem is not None:
        raise DataDirUnusable(problem)


# ---- the dir itself ---------------------------------------------------------------------


def ensure_dir(path: Path) -> Path:
    """Check the data dir, creating it (mode 0700) if it does not exist yet."""
    path = Path(path).expanduser()
    if not check_dir(path):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, path, "create data dir") from None
        check_dir(path)  # somebody may have raced us to it
    return path


class DataDir:
    """An open data dir: checked, created if needed, and locked until `close()`."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd
        # Appended lines (metrics.jsonl) are fsynced so a crash keeps them. An in-process
        # scenario turns this off: its nodes share one process, so no node can crash
        # alone, and 1000 nodes' fsyncs took 1-2 s of every round.
        self.durable = True

    @classmethod
    def open(cls, path: Path) -> DataDir:
        """Check, create and lock `path`; DataDirInUse if a running node holds it."""
        path = ensure_dir(path)
        return cls(path, _take_lock(path / LOCK_FILE))

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def close(self) -> None:
        """Release the lock (the lock file stays: unlinking it would race a new holder)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DataDir:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.path / name, data)

    def append(self, name: str, line: str) -> None:
        append_line(self.path / name, line, sync=self.durable)

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r}, locked={self.locked})"


def _take_lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
    except OSError as exc:
        raise os_error(exc, path, "create lock file") from None
    try:
        _check_regular(path, os.fstat(fd))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            who = f" (pid {holder})" if holder else ""
            raise DataDirInUse(
                f"data dir {path.parent} is in use by another running node{who}: "
                "stop that node, or give this one another --data-dir"
            ) from None
        # The holder's pid, for the message above; informational only.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise os_error(exc, path, "lock") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    return None


# ---- files ------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash at any instant leaves the old or the new file.

    The temp name is random and created exclusively, so nothing planted in advance (a
    symlink to a victim file) is ever opened; rename replaces whatever is at `path`
    without following it.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise os_error(exc, path, "write") from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise os_error(exc, path, "write") from None
        raise
    fsync_dir(path.parent)


def append_line(path: Path, line: str, *, sync: bool = True) -> None:
    """Append one line to a log in the data dir, never through a symlink, and fsync it
    (unless `sync` is False: see `DataDir.durable`).

    One write() per line under O_APPEND, so readers see whole lines. A crash mid-write can
    leave a torn last line; the next append starts on a fresh line so only that row is lost.
    Rewriting the whole file through `atomic_write` would cost O(file) per round forever.
    """
    data = line.rstrip("\n").encode("utf-8") + b"\n"
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
    except OSError as exc:
        raise os_error(exc, path, "write") from None
    try:
        st = os.fstat(fd)
        _check_regular(path, st)
        if st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n":
            data = b"\n" + data
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
    except OSError as exc:
        raise os_error(exc, path, "write") from None
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes | None:
    """The bytes of a regular file in the data dir (never via a symlink); None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    try:
        _check_regular(path, os.fstat(fd))
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (file systems that cannot are tolerated)."""
    fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise os_error(exc, directory, "sync") from None
    finally:
        os.close(fd)


def os_error(exc: OSError, path: Path, doing: str) -> FatalError:
    """One line for an OSError on the data dir: what happened to which path, what to do."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"disk full: cannot {doing} {path}: free some space on that file system "
            "(or move --data-dir); the node restarts from its last checkpoint"
        )
    if code == errno.EROFS:
        return DataDirUnusable(
            f"cannot {doing} {path}: read-only file system; use a writable --data-dir"
        )
    if code in (errno.EACCES, errno.EPERM):
        return DataDirUnusable(
            f"cannot {doing} {path}: permission denied (not writable by this user); "
            "make the data dir yours with mode 700, or use another --data-dir"
        )
    if code in _SYMLINK_ERRNOS:
        return DataDirUnusable(
            f"{path} is a symbolic link; p2pfl never follows links in its data dir: remove it"
        )
    if code == errno.ENOTDIR:
        return DataDirUnusable(
            f"cannot {doing} {path}: a part of the path is not a directory; fix --data-dir"
        )
    return DataDirUnusable(f"cannot {doing} {path}: {exc.strerror or exc}")


def _check_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise DataDirUnusable(f"{path} is not a regular file; move it out of the data dir")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


__all__ = [
    "LOCK_FILE",
    "DataDir",
    "append_line",
    "atomic_write",
    "check_dir",
    "check_private",
    "check_socket_path",
    "ensure_dir",
    "fsync_dir",
    "os_error",
    "read_file",
]
