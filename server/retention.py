"""The retention sweep (``[retention]``): every ``interval_seconds`` it deletes the jobs that
have expired, then gives the freed pages back to the file system.

A finished job expires when its terminal event is older than ``finished_days``; an unfinished
one when it has had no event for ``unfinished_days``; ``[retention.kinds.<kind>]`` overrides
either for one kind; 0 keeps forever. Expired jobs are found on a reader connection, through
the partial indexes of migrations/0005_retention.sql (tests/test_retention.py checks the
plans), and deleted through the writer in transactions of at most ``batch_events`` events
(``server.deletion``): one at a time, each behind the appends queued before it, so appends
wait for one small transaction at most, never for the sweep. Open streams of a deleted job
end with 4410, as after ``DELETE``.

Deleted rows leave free pages inside the file; with ``auto_vacuum = INCREMENTAL`` (set on a
new database before its first table, ``server.migrate``; ``jobfeed vacuum`` converts an
older file) the sweep then runs ``PRAGMA incremental_vacuum`` in steps of ``vacuum_pages``,
also through the writer, and the file shrinks at the next checkpoint.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from .config import RetentionConfig
from .deletion import BatchOutcome, Candidate, JobDeleter, JobRow
from .errors import ServiceError
from .tenancy import JobKey
from .writer import Writer

log = structlog.get_logger("jobfeed.retention")

# After each of its transactions the sweep rests this many times as long as the transaction
# took: the writer spends at most half its time purging, and the event loop (fan-out) and the
# SQLite thread do not compete for the CPU the whole time a big purge lasts.
REST_RATIO = 1.0

# Candidates read per query page (on a reader; they are then deleted batch by batch).
PAGE_JOBS = 1_000

# Keyset pages over the partial indexes (``(finished_at, job_no) > (?, ?)``: a search of the
# index, not a scan from its start). As constants, so that the tests check these plans.
FINISHED_SQL = (
    "SELECT job_no, tenant, job_id, last_seq, kind, finished_at FROM jobs"
    " WHERE finished_at IS NOT NULL AND finished_at < ? AND (finished_at, job_no) > (?, ?)"
    " ORDER BY finished_at, job_no LIMIT ?"
)
FINISHED_KIND_SQL = (
    "SELECT job_no, tenant, job_id, last_seq, kind, finished_at FROM jobs"
    " WHERE kind = ? AND finished_at IS NOT NULL AND finished_at < ?"
    " AND (finished_at, job_no) > (?, ?) ORDER BY finished_at, job_no LIMIT ?"
)
UNFINISHED_SQL = (
    "SELECT job_no, tenant, job_id, last_seq, kind, updated_at FROM jobs"
    " WHERE finished_at IS NULL AND job_no > ? ORDER BY job_no LIMIT ?"
)
OLDEST_EVENT_SQL = "SELECT ts FROM events ORDER BY id LIMIT 1"

ReadFn = Callable[[str, Sequence[object]], Awaitable[list[sqlite3.Row]]]


def _iso(moment: datetime) -> str:
    """The log's own ts format, so that cutoffs compare as strings."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ts_seconds(ts: str) -> float:
    """A stored ts ("YYYY-MM-DDTHH:MM:SS.ffffffZ") as Unix seconds."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


class RetentionPolicy:
    """The cutoffs of one sweep: a job is expired when its terminal event (finished) or its
    last event (unfinished) is older than its kind's cutoff; None: kept."""

    def __init__(self, config: RetentionConfig, now: datetime) -> None:
        def cutoff(days: float | None) -> str | None:
            return None if not days else _iso(now - timedelta(days=days))

        self.finished = cutoff(config.finished_days)
        self.unfinished = cutoff(config.unfinished_days)
        self.kinds: dict[str, tuple[str | None, str | None]] = {}
        for kind, own in config.kinds.items():
            finished = config.finished_days if own.finished_days is None else own.finished_days
            unfinished = (
                config.unfinished_days if own.unfinished_days is None else own.unfinished_days
            )
            self.kinds[kind] = (cutoff(finished), cutoff(unfinished))

    def finished_cutoff(self, kind: str | None) -> str | None:
        own = self.kinds.get(kind) if kind is not None else None
        return self.finished if own is None else own[0]

    def unfinished_cutoff(self, kind: str | None) -> str | None:
        own = self.kinds.get(kind) if kind is not None else None
        return self.unfinished if own is None else own[1]

    def expired(self, job: JobRow) -> bool:
        if job.finished_at is not None:
            cutoff = self.finished_cutoff(job.kind)
            return cutoff is not None and job.finished_at < cutoff
        cutoff = self.unfinished_cutoff(job.kind)
        return cutoff is not None and job.updated_at < cutoff

    def finished_searches(self) -> list[tuple[str, list[object]]]:
        """The queries (and leading parameters) that find expired finished jobs: one for
        each kind with its own cutoff, one over all kinds with the default cutoff (rows of
        the kinds with their own are then skipped)."""
        searches: list[tuple[str, list[object]]] = []
        for kind, (finished, _) in sorted(self.kinds.items()):
            if finished is not None:
                searches.append((FINISHED_KIND_SQL, [kind, finished]))
        if self.finished is not None:
            searches.append((FINISHED_SQL, [self.finished]))
        return searches

    @property
    def any_unfinished(self) -> bool:
        return self.unfinished is not None or any(u is not None for _, u in self.kinds.values())


@dataclass(slots=True)
class SweepReport:
    """What one sweep did (its log line, and GET /metrics)."""

    jobs: int = 0
    events: int = 0
    transactions: int = 0
    longest_transaction: float = 0.0  # seconds, deletions and vacuum steps alike
    vacuum_pages: int = 0
    seconds: float = 0.0

    def add(self, outcome: BatchOutcome) -> None:
        self.jobs += outcome.jobs
        self.events += outcome.events
        self.transactions += 1
        self.longest_transaction = max(self.longest_transaction, outcome.seconds)


class RetentionSweep:
    def __init__(
        self, config: RetentionConfig, read: ReadFn, writer: Writer, deleter: JobDeleter
    ) -> None:
        self._config = config
        self._read = read
        self._writer = writer
        self._deleter = deleter
        self.sweeps = 0
        self.last: SweepReport | None = None
        self._vacuum_checked = False
        self._incremental = False
        self._running = asyncio.Lock()  # one sweep at a time (the loop's, or a caller's)
        self.swept = asyncio.Event()  # set once a sweep has completed

    async def run_forever(self) -> None:
        """A sweep at start (what expired while the server was down), then one every
        ``interval_seconds``. A failed sweep is logged; the next one starts over."""
        while True:
            try:
                await self.sweep()
            except (ServiceError, sqlite3.Error) as exc:
                log.warning("retention_failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:
                log.exception("retention_failed")
            await asyncio.sleep(self._config.interval_seconds)

    async def sweep(self, now: datetime | None = None) -> SweepReport:
        """One sweep, with the cutoffs as of ``now`` (default: the clock)."""
        async with self._running:
            return await self._sweep(now)

    async def _sweep(self, now: datetime | None) -> SweepReport:
        policy = RetentionPolicy(self._config, now or datetime.now(UTC))
        report = SweepReport()
        started = time.perf_counter()
        await self._purge(report)  # what an earlier sweep (or a crash) left behind
        for query, params in policy.finished_searches():
            await self._delete_finished(query, params, policy, report)
        if policy.any_unfinished:
            await self._delete_unfinished(policy, report)
        await self._vacuum(report)
        report.seconds = time.perf_counter() - started
        self.sweeps += 1
        self.last = report
        self.swept.set()
        log.info(
            "retention_swept",
            jobs=report.jobs,
            events=report.events,
            transactions=report.transactions,
            longest_transaction_ms=round(report.longest_transaction * 1000, 3),
            vacuum_pages=report.vacuum_pages,
            seconds=round(report.seconds, 3),
        )
        return report

    async def _delete_finished(
        self, query: str, params: list[object], policy: RetentionPolicy, report: SweepReport
    ) -> None:
        after: tuple[str, int] = ("", 0)
        while True:
            rows = await self._read(query, [*params, *after, PAGE_JOBS])
            if not rows:
                return
            found: list[Candidate] = []
            for job_no, tenant, job_id, last_seq, kind, finished_at in rows:
                finished = finished_at.decode()
                after = (finished, job_no)
                kind_name = None if kind is None else kind.decode()
                cutoff = policy.finished_cutoff(kind_name)
                if cutoff is not None and finished < cutoff:
                    found.append(
                        Candidate(JobKey(tenant.decode(), job_id.decode()), job_no, last_seq)
                    )
            await self._delete(found, policy, report)
            if len(rows) < PAGE_JOBS:
                return

    async def _delete_unfinished(self, policy: RetentionPolicy, report: SweepReport) -> None:
        after = 0
        while True:
            rows = await self._read(UNFINISHED_SQL, [after, PAGE_JOBS])
            if not rows:
                return
            found: list[Candidate] = []
            for job_no, tenant, job_id, last_seq, kind, updated_at in rows:
                after = job_no
                cutoff = policy.unfinished_cutoff(None if kind is None else kind.decode())
                if cutoff is not None and updated_at.decode() < cutoff:
                    found.append(
                        Candidate(JobKey(tenant.decode(), job_id.decode()), job_no, last_seq)
                    )
            await self._delete(found, policy, report)
            if len(rows) < PAGE_JOBS:
                return

    async def _delete(
        self, candidates: list[Candidate], policy: RetentionPolicy, report: SweepReport
    ) -> None:
        batch = self._config.batch_events
        while candidates:
            outcome = await self._deleter.delete_expired(candidates, batch, policy.expired)
            report.add(outcome)
            await _rest(outcome.seconds)
            candidates = candidates[outcome.handled :]
            await self._purge(report)

    async def _purge(self, report: SweepReport) -> None:
        while self._deleter.purging:
            outcome = await self._deleter.purge_step(self._config.batch_events)
            report.add(outcome)
            await _rest(outcome.seconds)

    async def _vacuum(self, report: SweepReport) -> None:
        """Give free pages back, ``vacuum_pages`` per step, each step through the writer."""
        if not self._vacuum_checked:
            self._vacuum_checked = True
            self._incremental = await self._writer.run_exclusive(self._is_incremental)
            if not self._incremental:
                log.warning(
                    "retention_vacuum_off",
                    hint="the database was made without auto_vacuum = INCREMENTAL: deleted "
                    "pages are reused but the file does not shrink; run `jobfeed vacuum` "
                    "once with the server stopped (docs/operations.md)",
                )
        if not self._incremental:
            return
        while True:
            freed, seconds = await self._writer.run_exclusive(self._vacuum_step)
            if not freed:
                return
            report.vacuum_pages += freed
            report.longest_transaction = max(report.longest_transaction, seconds)
            await _rest(seconds)

    async def _is_incremental(self) -> bool:
        rows = list(await self._writer.connection.execute_fetchall("PRAGMA auto_vacuum"))
        return bool(rows) and rows[0][0] == 2  # 0 none, 1 full, 2 incremental

    async def _vacuum_step(self) -> tuple[int, float]:
        conn = self._writer.connection
        started = time.perf_counter()
        rows = list(await conn.execute_fetchall("PRAGMA freelist_count"))
        free = rows[0][0] if rows else 0
        if not free:
            return 0, 0.0
        pages = min(free, self._config.vacuum_pages)
        # SQLite frees one page per step of this statement, and the sqlite3 module steps a
        # statement without result rows once: executescript steps it to the end.
        await conn.executescript(f"PRAGMA incremental_vacuum({pages})")
        return pages, time.perf_counter() - started


async def _rest(seconds: float) -> None:
    await asyncio.sleep(seconds * REST_RATIO)
