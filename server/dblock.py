"""One jobfeed process per database file: an exclusive lock held while the file is in use.

The writer keeps job state and the next id in memory and wakes subscribers inside its own
process, so a second server on the same file would answer ``/readyz`` 200 while every append
it tried failed (SQLite's write lock is taken by the first). ``serve`` and ``migrate`` take
this lock first and refuse, with one line, when another process holds it.

Why ``flock`` on ``<db>.lock`` rather than a lock on the database itself: SQLite takes POSIX
(``fcntl``) byte-range locks on the database, and POSIX locks belong to the process, so
closing *any* descriptor of the file (a reader connection, a migration's connection) would
silently drop a lock we took on it; ``locking_mode = EXCLUSIVE`` would shut out our own read
connections. A ``flock`` on a file of its own is independent of all of that, belongs to the
open file (a second ``Store`` in the same process is refused too), and the kernel releases
it when the process dies, even by SIGKILL, so a crash never leaves a stale lock behind (the
file itself stays; only the lock on it counts). Like WAL mode, it needs a local filesystem.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DatabaseInUse(Exception):
    """Another process holds the database's lock; the message is one line."""


def lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


class DatabaseLock:
    """``acquire()`` or raise ``DatabaseInUse``; ``release()`` (idempotent) lets go."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DatabaseInUse(
                f"{self.db_path} is in use by another jobfeed process{holder} "
                f"(lock {self.path}); run one jobfeed per database file"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder's pid, for the refusal message only: the lock, not the file, decides.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file unlocks it
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


# -- a backup in progress ------------------------------------------------------------------------


def backup_marker_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".backup")


class BackupMarker:
    """Held (a shared ``flock`` on ``<db>.backup``) by ``jobfeed backup`` while its copy
    reads the database, so that the server's writer knows that the reader pinning the WAL is
    a backup, which it must not wait for (``server.wal``). Shared: backups may overlap. The
    kernel drops it when the process ends, however it ends."""

    def __init__(self, db_path: Path) -> None:
        self.path = backup_marker_path(db_path)
        self._fd: int | None = None

    def __enter__(self) -> BackupMarker:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def backup_running(db_path: Path) -> bool:
    """Whether some process holds ``BackupMarker`` on ``db_path`` now (an open, a
    non-blocking ``flock`` and a close: microseconds, asked only when a WAL restart is due)."""
    try:
        fd = os.open(backup_marker_path(db_path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing our descriptor also drops the lock we may have taken
    return False
