"""Deleting jobs: ``DELETE /v1/jobs/{id}`` and the retention sweep's small transactions.

Every deletion is exclusive work of the writer (``Writer.run_exclusive``): it runs between
two commit groups, so an append queued before it lands first and is deleted with the job, and
one queued after it finds no job (404). After COMMIT, still in the writer's task, the job is
forgotten everywhere it is held in memory: the writer's job cache and status counts, the
hub's per-job frames and the feed's recent frames (``Hub.forget_jobs``), which also ends
every open stream of it with 4410.

A deletion by the API is one transaction: the job row, its events (and with them its
idempotency keys, which are columns of the events). Retention deletes in transactions of at
most ``retention.batch_events`` events, whole jobs packed together; a job whose log is larger
loses its row and its first events in one transaction (from then on it answers 404, and its
remaining events are hidden from feed replays: ``Writer.purging``), and the rest in as many
more as it takes. Every deletion records the highest event id it removed
(``log_head.max_deleted_id``), so ids are never handed out twice.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiosqlite
import structlog

from .errors import CommitOutcomeUnknown, JobNotFound, StorageUnavailable
from .hub import Hub
from .metrics import Histogram
from .tenancy import JobKey
from .writer import Writer

log = structlog.get_logger("jobfeed.deletion")

REASONS = ("api", "retention")
# Seconds one deletion transaction held the writer; the sweep aims at a few milliseconds.
TRANSACTION_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)

_JOB_SQL = (
    "SELECT job_no, status, last_seq, kind, updated_at, finished_at FROM jobs"
    " WHERE tenant = ? AND job_id = ?"
)
# The newest event of a job is its last seq: one descent of UNIQUE (tenant, job_id, seq).
_NEWEST_ID_SQL = "SELECT id FROM events WHERE tenant = ? AND job_id = ? ORDER BY seq DESC LIMIT 1"
_DELETE_EVENTS_SQL = "DELETE FROM events WHERE tenant = ? AND job_id = ?"
# A job's oldest events first, a bounded number: the rest stay for the next transaction.
_DELETE_SOME_EVENTS_SQL = (
    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE tenant = ? AND job_id = ?"
    " ORDER BY seq LIMIT ?)"
)
_DELETE_JOB_SQL = "DELETE FROM jobs WHERE tenant = ? AND job_id = ?"
_MAX_DELETED_SQL = "UPDATE log_head SET max_deleted_id = max(max_deleted_id, ?) WHERE id = 1"


@dataclass(frozen=True, slots=True)
class JobRow:
    """What the deletion reads of a job, in its transaction."""

    job_no: int
    status: str
    last_seq: int
    kind: str | None
    updated_at: str
    finished_at: str | None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A job the sweep found expired (on a reader, before the transaction): ``job_no``
    names the incarnation, so a job deleted and created again meanwhile is left alone."""

    key: JobKey
    job_no: int
    events: int  # its last_seq: the log is seq 1..last_seq


@dataclass(slots=True)
class BatchOutcome:
    """What one retention transaction removed."""

    jobs: int = 0
    events: int = 0
    seconds: float = 0.0
    handled: int = 0  # candidates looked at (deleted or skipped); the rest were not reached


class JobDeleter:
    """Deletions through the writer, and their counters (GET /metrics)."""

    def __init__(self, writer: Writer, hub: Hub) -> None:
        self._writer = writer
        self._hub = hub
        self.jobs_deleted = dict.fromkeys(REASONS, 0)
        self.events_deleted = dict.fromkeys(REASONS, 0)
        self.transaction_seconds = Histogram(TRANSACTION_SECONDS_BUCKETS)
        writer.purge_leftovers = self._purge_leftovers

    @property
    def purging(self) -> set[JobKey]:
        return self._writer.purging

    # -- the API ---------------------------------------------------------------------------

    async def delete_job(self, key: JobKey) -> int:
        """Delete job ``key`` (its row, events and keys) in one transaction; the number of
        events removed. ``JobNotFound`` if there is no such job."""
        return await self._writer.run_exclusive(lambda: self._delete_now(key))

    async def _delete_now(self, key: JobKey) -> int:
        conn = self._writer.connection
        started = time.perf_counter()
        async with _transaction(self._writer):
            job = await _read_job(conn, key)
            if job is None:
                raise JobNotFound(key.job_id)
            await _note_newest(conn, key)
            cursor = await conn.execute(_DELETE_EVENTS_SQL, key)
            removed = cursor.rowcount
            await conn.execute(_DELETE_JOB_SQL, key)
        self._forgotten([(key, job.status)], removed, "api", time.perf_counter() - started)
        return removed

    # -- retention -------------------------------------------------------------------------

    async def delete_expired(
        self,
        candidates: list[Candidate],
        max_events: int,
        still_expired: Callable[[JobRow], bool],
    ) -> BatchOutcome:
        """One transaction: delete ``candidates`` in order while their events fit in
        ``max_events``; the first one that does not fit loses its row and ``max_events``
        of its events minus those already taken, and the rest later (``purge_step``).
        Each is read again inside the transaction and skipped unless it is the same job
        (``job_no``) and ``still_expired``."""
        return await self._writer.run_exclusive(
            lambda: self._delete_batch(candidates, max_events, still_expired)
        )

    async def _delete_batch(
        self,
        candidates: list[Candidate],
        max_events: int,
        still_expired: Callable[[JobRow], bool],
    ) -> BatchOutcome:
        conn = self._writer.connection
        started = time.perf_counter()
        outcome = BatchOutcome()
        gone: list[tuple[JobKey, str]] = []
        newly_purging: list[JobKey] = []
        budget = max_events
        async with _transaction(self._writer):
            for candidate in candidates:
                if budget <= 0:
                    break
                key = candidate.key
                outcome.handled += 1
                job = await _read_job(conn, key)
                if job is None or job.job_no != candidate.job_no or not still_expired(job):
                    continue
                await _note_newest(conn, key)
                if job.last_seq <= budget:
                    cursor = await conn.execute(_DELETE_EVENTS_SQL, key)
                else:
                    cursor = await conn.execute(_DELETE_SOME_EVENTS_SQL, (*key, budget))
                    await conn.execute(
                        "INSERT OR IGNORE INTO purging (tenant, job_id) VALUES (?, ?)", key
                    )
                    newly_purging.append(key)
                await conn.execute(_DELETE_JOB_SQL, key)
                budget -= cursor.rowcount
                outcome.events += cursor.rowcount
                gone.append((key, job.status))
        outcome.jobs = len(gone)
        outcome.seconds = time.perf_counter() - started
        self.purging.update(newly_purging)
        self._forgotten(gone, outcome.events, "retention", outcome.seconds)
        return outcome

    async def purge_step(self, max_events: int) -> BatchOutcome:
        """One transaction removing up to ``max_events`` events of jobs already deleted
        (``purging``); a job whose last events go leaves the set."""
        return await self._writer.run_exclusive(lambda: self._purge_now(max_events))

    async def _purge_now(self, max_events: int) -> BatchOutcome:
        conn = self._writer.connection
        started = time.perf_counter()
        outcome = BatchOutcome()
        finished: list[JobKey] = []
        budget = max_events
        async with _transaction(self._writer):
            for key in list(self.purging):
                if budget <= 0:
                    break
                cursor = await conn.execute(_DELETE_SOME_EVENTS_SQL, (*key, budget))
                removed = cursor.rowcount
                budget -= removed
                outcome.events += removed
                if budget > 0:  # fewer than asked for: nothing of the job is left
                    await conn.execute("DELETE FROM purging WHERE tenant = ? AND job_id = ?", key)
                    finished.append(key)
        outcome.seconds = time.perf_counter() - started
        self.purging.difference_update(finished)
        self._count(0, outcome.events, "retention", outcome.seconds)
        return outcome

    async def _purge_leftovers(self, key: JobKey) -> None:
        """Called by the writer before it creates ``key`` again while its old events are
        still being purged: they go now, in one transaction (seq 1 must be free)."""
        conn = self._writer.connection
        started = time.perf_counter()
        async with _transaction(self._writer):
            cursor = await conn.execute(_DELETE_EVENTS_SQL, key)
            await conn.execute("DELETE FROM purging WHERE tenant = ? AND job_id = ?", key)
        self.purging.discard(key)
        self._count(0, cursor.rowcount, "retention", time.perf_counter() - started)

    # -- after COMMIT ----------------------------------------------------------------------

    def _forgotten(
        self, gone: list[tuple[JobKey, str]], events: int, reason: str, seconds: float
    ) -> None:
        """The committed deletion, everywhere it is held in memory, and in the counters."""
        for key, status in gone:
            self._writer.forget(key, status)
        if gone:
            self._hub.forget_jobs([key for key, _ in gone])
        self._count(len(gone), events, reason, seconds)

    def _count(self, jobs: int, events: int, reason: str, seconds: float) -> None:
        self.jobs_deleted[reason] += jobs
        self.events_deleted[reason] += events
        self.transaction_seconds.observe(seconds)


async def _read_job(conn: aiosqlite.Connection, key: JobKey) -> JobRow | None:
    rows = list(await conn.execute_fetchall(_JOB_SQL, key))
    return None if not rows else JobRow(*rows[0])


async def _note_newest(conn: aiosqlite.Connection, key: JobKey) -> None:
    """Record the job's newest event id as deleted: never handed out again."""
    rows = list(await conn.execute_fetchall(_NEWEST_ID_SQL, key))
    if rows:
        await conn.execute(_MAX_DELETED_SQL, (rows[0][0],))


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT on the writer's connection. A failure before COMMIT rolls
    back and answers 503 ``storage_unavailable``; a failed COMMIT may or may not have
    landed (``CommitOutcomeUnknown``): nothing is forgotten from memory then, and a retry
    finds the job gone or deletes it."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._conn = writer.connection

    async def __aenter__(self) -> None:
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot delete now ({exc})") from exc

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: object, _: object) -> None:
        if exc_type is not None:
            await self._rollback()
            if isinstance(exc, sqlite3.Error):
                log.warning("deletion_failed", error=f"{type(exc).__name__}: {exc}")
                raise StorageUnavailable(f"cannot delete now ({exc})") from exc
            return
        try:
            await self._conn.execute("COMMIT")
        except sqlite3.Error as commit_error:
            await self._rollback()
            self._writer.forget_all()  # believe only the file from here on
            log.warning("deletion_commit_failed", error=str(commit_error))
            raise CommitOutcomeUnknown(f"{type(commit_error).__name__}: {commit_error}") from None

    async def _rollback(self) -> None:
        try:
            await self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.debug("rollback_failed")
