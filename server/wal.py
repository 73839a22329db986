"""The WAL's size: checkpoints kept off the commit path, and a restart before it passes a bound.

Every connection turns SQLite's automatic checkpoint off: run inside a COMMIT it cost the
append path ~10 ms at p99 (measured on this project's 2-core machines). Two things replace it:

1. ``Store`` runs a ``PASSIVE`` checkpoint from its own connection every
   ``storage.checkpoint_seconds``: it copies committed frames into the database and never
   waits for, or blocks, the writer or a reader. It does the bulk of the copying.
2. A passive checkpoint never makes the WAL *restart*, though. SQLite writes the WAL from its
   start again only when a writer begins a transaction and finds every frame copied and no
   reader still using one; under steady appends the next commit always came first, so the
   ``-wal`` file grew for as long as appends went on (~300 MiB in 20 s of one producer). So
   the writer, between two groups, calls ``WalBound.restart_if_due``: once the file passes
   ``restart_at`` (half of ``storage.wal_max_bytes``), it runs a ``RESTART`` checkpoint on
   its own connection. It is the only writer and holds no transaction then, so nothing it
   waits for is another writer: the checkpoint copies what the passive one has not yet
   copied (about one interval's worth), then waits for readers still on old frames to end
   their current query (each read is one statement, milliseconds; readers that start
   meanwhile read from the database file and do not hold it up), and the writer's next
   commit starts the WAL over. That wait is short (``RESTART_WAIT_MS``, SQLite's busy
   handler): if a reader holds old frames for longer, the attempt gives up and is tried
   again after the WAL grows by another ``retry_step``, so the append path does not stall
   behind it; only near the bound does the writer wait as long as it would for any lock.

3. A backup (``jobfeed backup``, ``server.backup``) reads the whole database in one read
   transaction, seconds on a large file, and holds ``BackupMarker`` meanwhile. While it is
   held the writer does not attempt a restart at all (it would wait for that reader: 100 ms
   per attempt below the bound, ``busy_timeout_ms`` above it, holding appends up for the
   length of the copy). The WAL then grows past the bound by what is appended during the
   copy, and the first restart after the copy brings it back (docs/operations.md has the
   measured figures). The check is a ``flock`` probe of ``<db>.backup``, made only when a
   restart is due.

``PRAGMA journal_size_limit = restart_at`` on the writer's connection makes SQLite cut the
file back to ``restart_at`` at the first commit after each restart, so the file stays at
about that size and is overwritten in place. Not ``TRUNCATE`` to zero: a commit that extends
the file pays for the size change in its fsync (here p50 280 µs against 150 µs in place), and
after a truncation every commit would extend it again. The file's size is therefore the
trigger too: it passes ``restart_at`` only when the WAL's content does.

The bound: the file stays under ``restart_at`` plus what is committed before a restart
succeeds, normally one group; ``wal_max_bytes`` leaves the other half for groups and for
attempts that readers hold up.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import aiosqlite
import structlog

from .dblock import backup_running

log = structlog.get_logger("jobfeed.wal")

# How long a restart waits for readers on old frames (SQLite's busy handler sleeps 1, 2, 5,
# 10 ... ms between tries). Our readers' queries take milliseconds; anything longer is not
# ours to wait for on the append path, and the next attempt comes soon enough.
RESTART_WAIT_MS = 100


class WalBound:
    """The writer's side of the bound: when to restart the WAL, and doing it."""

    def __init__(self, db_path: Path, max_bytes: int) -> None:
        self.db_path = db_path
        self.wal_path = db_path.with_name(db_path.name + "-wal")
        self.max_bytes = max_bytes
        self.restart_at = max_bytes // 2
        self.retry_step = max(max_bytes // 16, 4096)
        self._next_attempt_at = self.restart_at
        # Held by the store's passive checkpoint while it runs: SQLite allows one checkpoint
        # at a time and answers a second one "busy" at once, without waiting.
        self.checkpoint_lock = asyncio.Lock()
        # The writer asks the store's checkpoint task for a passive checkpoint now (instead of
        # at its next tick) when the WAL passes restart_at, and restarts once that one ran.
        self.passive_wanted = asyncio.Event()
        self.passive_runs = 0
        self._passive_asked_at: int | None = None  # passive_runs when the writer asked
        self.restarts = 0  # RESTART checkpoints that succeeded
        self.held_up = 0  # attempts given up because a reader kept using old frames
        self.skipped_for_backup = 0  # restarts due while a backup held its marker
        self._backup_logged = False
        self._failing = False

    def wal_bytes(self) -> int:
        try:
            return os.stat(self.wal_path).st_size
        except FileNotFoundError:
            return 0

    async def configure(self, conn: aiosqlite.Connection) -> None:
        """On the writer's connection: the size SQLite cuts the file back to after a restart."""
        await conn.execute(f"PRAGMA journal_size_limit = {self.restart_at}")

    def restart_due(self) -> bool:
        """Whether ``restart_if_due`` would look further than the file's size now (the
        writer then lets the group in flight finish before it plans the next one)."""
        return self.wal_bytes() > self._next_attempt_at

    async def restart_if_due(self, conn: aiosqlite.Connection, busy_timeout_ms: int) -> None:
        """Between groups, on the writer's connection (no transaction open): restart the WAL
        if the file has passed ``restart_at``. Never raises: the WAL just stays longer.

        Below the bound an attempt is cheap or skipped (the passive checkpoint is running;
        a reader holds old frames for ``RESTART_WAIT_MS``). Once the next growth step would
        pass ``max_bytes``, the writer waits as long as for any lock (``busy_timeout_ms``):
        for the passive checkpoint to finish and for every reader's current query to end.
        Only a reader that holds one snapshot for longer than that (another process) can
        take the WAL past the bound; ``wal_over_bound`` is logged then.
        """
        size = self.wal_bytes()
        if size <= self._next_attempt_at:
            return
        if backup_running(self.db_path):
            # The backup's read pins the WAL until its copy ends: waiting for it would hold
            # appends up for that long. Let the WAL grow; look again one step later.
            self.skipped_for_backup += 1
            self._next_attempt_at = size + self.retry_step
            if size > self.max_bytes and not self._backup_logged:
                log.warning("wal_over_bound_during_backup", wal_bytes=size)
                self._backup_logged = True
            return
        self._backup_logged = False
        urgent = size + self.retry_step > self.max_bytes
        if not urgent:
            if self._passive_asked_at is None:
                self._passive_asked_at = self.passive_runs
                self.passive_wanted.set()
                return
            if self.passive_runs == self._passive_asked_at or self.checkpoint_lock.locked():
                return  # the copying is still under way, off the append path
        self._passive_asked_at = None
        wait_ms = busy_timeout_ms if urgent else min(RESTART_WAIT_MS, busy_timeout_ms)
        try:
            async with self.checkpoint_lock:
                await conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
                try:
                    rows = list(await conn.execute_fetchall("PRAGMA wal_checkpoint(RESTART)"))
                finally:
                    await conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        except sqlite3.Error as exc:
            self._next_attempt_at = size + self.retry_step
            if not self._failing:
                log.warning("wal_restart_failed", error=f"{type(exc).__name__}: {exc}")
            self._failing = True
            return
        self._failing = False
        busy = rows[0][0] if rows else 1
        if busy:
            # A reader kept old frames in use: try again once the WAL has grown a little more.
            self.held_up += 1
            self._next_attempt_at = size + self.retry_step
            if urgent:
                log.warning("wal_over_bound", wal_bytes=size, wal_max_bytes=self.max_bytes)
            return
        self.restarts += 1
        self._next_attempt_at = self.restart_at
        log.debug("wal_restarted", wal_bytes=size)
