"""``jobfeed backup`` and ``jobfeed restore`` (operations.md, "Backup and restore").

Backup: ``VACUUM INTO`` a temporary file beside DEST, from a connection of its own, while the
server serves. It reads one snapshot of the database in one read transaction, which in WAL
mode never blocks the writer (and the writer never blocks it), so appends are held up by
nothing at all: the copy is the database as of the moment the read began, every event
acknowledged before that included. SQLite's online backup API was the other candidate; it
copies in steps and starts over whenever another connection writes the source between two
steps, so under continuous appends it may never finish (or it copies in one step, the same
single read transaction as ``VACUUM INTO``, without compacting the copy). What the read costs:
while it lasts, the writer's WAL restarts (``server.wal``) cannot happen, so the ``-wal`` file
grows by what is appended meanwhile (docs/operations.md has the measured figures). No lock on
``<db>.lock``: the server holds it, and a backup must not need it.

Then the copy is checked (``PRAGMA integrity_check``, complete, not the quick one), made a
self-contained file (rollback journal, nothing beside it), flushed to disk, and renamed to
DEST: DEST is either absent, the previous file, or a complete checked copy, never half of one.

Restore (the server stopped: it takes the lock and names the holder otherwise): the backup is
copied beside the database, checked, migrated (a backup from an older schema is brought up to
date; one from a newer jobfeed is refused), and made a new generation (``server.generation``),
then renamed over the database. The old file's ``-wal`` and ``-shm`` go first (after a
checkpoint, so the old file is whole without them): a ``-wal`` left beside the new file would be
replayed into it by the next open, as if it were the new file's own.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .dblock import BackupMarker, DatabaseLock
from .generation import Generation, read_generation, start_next_generation
from .migrate import MigrationError, apply_migrations, schema_version


class BackupError(Exception):
    """The backup or restore cannot be done; the message is one line."""


@dataclass(frozen=True, slots=True)
class Contents:
    """What a database file holds, for the one line the commands print."""

    jobs: int
    events: int
    last_id: int
    schema: int
    generation: Generation | None  # None before schema 0008
    size_bytes: int

    def describe(self) -> str:
        generation = self.generation.feed_epoch if self.generation else "none (schema < 8)"
        return (
            f"{self.jobs} jobs, {self.events} events, last id {self.last_id}, "
            f"schema {self.schema}, generation {generation}, {self.size_bytes} bytes"
        )


def backup(db_path: Path, dest: Path, *, force: bool = False) -> Contents:
    """Copy the live database at ``db_path`` to ``dest``; what the copy holds."""
    if not db_path.exists():
        raise BackupError(f"{db_path} does not exist (storage.path)")
    if dest.exists() and not force:
        raise BackupError(f"{dest} exists; pass --force to replace it")
    if dest.is_dir():
        raise BackupError(f"{dest} is a directory; give the backup file's name")
    temp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    _remove(temp)
    try:
        # The marker tells the server's writer not to wait for this read (server.wal).
        with BackupMarker(db_path):
            source = sqlite3.connect(db_path, isolation_level=None)
            try:
                source.execute("PRAGMA busy_timeout = 5000")
                source.execute("VACUUM INTO ?", (str(temp),))
            finally:
                source.close()
        contents = _check_copy(temp)
        _fsync(temp)
        os.replace(temp, dest)
        _fsync_dir(dest.parent)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{db_path}: {exc}") from exc
    finally:
        _remove(temp)
    return contents


def restore(db_path: Path, src: Path) -> tuple[Contents, Generation]:
    """Put the backup ``src`` in place of the database at ``db_path`` (server stopped) as a
    new generation; what it holds and the generation it left."""
    if not src.is_file():
        raise BackupError(f"{src} is not a file")
    lock = DatabaseLock(db_path)
    lock.acquire()  # DatabaseInUse (with the holder's pid) while a server has the file
    temp = db_path.with_name(f".{db_path.name}.restoring-{os.getpid()}")
    try:
        _copy_database(src, temp)
        _check_copy(temp)
        try:
            apply_migrations(temp)
        except MigrationError as exc:
            raise BackupError(f"{src}: {exc}") from exc
        previous = max(_generation_number(temp), _generation_number(db_path))
        generation = _start_generation(temp, previous)
        contents = _check_copy(temp)
        _fsync(temp)
        _retire(db_path)
        os.replace(temp, db_path)
        _fsync_dir(db_path.parent)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{src}: {exc}") from exc
    finally:
        for leftover in _with_sidecars(temp):
            _remove(leftover)
        lock.release()
    return contents, generation


def _copy_database(src: Path, dest: Path) -> None:
    """SQLite's own copy (a ``-wal`` beside ``src`` is read too), without writing to ``src``."""
    for leftover in _with_sidecars(dest):
        _remove(leftover)
    source = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True)
    try:
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()


def _check_copy(path: Path) -> Contents:
    """``PRAGMA integrity_check`` on a copy, make it one self-contained file, and count."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        problems = [str(row[0]) for row in conn.execute("PRAGMA integrity_check(10)")]
        if problems != ["ok"]:
            first = " ".join(problems[0].split())
            raise BackupError(f"the copy fails PRAGMA integrity_check: {first}")
        # A backup is one file: no -wal beside it to lose when it is copied elsewhere.
        conn.execute("PRAGMA journal_mode = DELETE")
        jobs, events, last_id = conn.execute(
            "SELECT (SELECT COUNT(*) FROM jobs), (SELECT COUNT(*) FROM events),"
            " (SELECT COALESCE(MAX(id), 0) FROM events)"
        ).fetchone()
        schema = schema_version(conn)
        generation = read_generation(conn) if _has_table(conn, "generation") else None
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"the copy cannot be read: {exc}") from exc
    finally:
        conn.close()
    return Contents(jobs, events, last_id, schema, generation, path.stat().st_size)


def _generation_number(path: Path) -> int:
    """The generation of the file at ``path``, 0 when it has none (or cannot be read: a
    damaged database is a reason to restore, and the new tag keeps the epochs apart)."""
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        return read_generation(conn).number if _has_table(conn, "generation") else 0
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _start_generation(path: Path, previous: int) -> Generation:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            generation = start_next_generation(conn, previous)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return generation


def _retire(db_path: Path) -> None:
    """Before the new file takes the old one's name: fold the old file's WAL into it (so it
    is whole on its own until the rename), then remove its ``-wal``, ``-shm`` and any
    ``-journal``. Each would otherwise be taken for the new file's own at the next open."""
    if db_path.exists():
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(db_path, isolation_level=None)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
    for sidecar in _with_sidecars(db_path)[1:]:
        _remove(sidecar)


def _with_sidecars(path: Path) -> list[Path]:
    return [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync(path: Path) -> None:
    """SQLite does not flush what ``VACUUM INTO`` (or a closed copy) wrote; we do, before the
    rename makes it the backup."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(started: float) -> str:
    return f"{time.monotonic() - started:.2f} s"
