"""The single writer: every append and job creation, committed in groups.

Requests queue up while a commit is in flight; the next round takes all of them (up to
``storage.max_batch_events``) into one transaction: events, new jobs and snapshot updates
together. Only after COMMIT returns are the new frames published to the hub and the callers
answered, so nothing is acknowledged or sent that a crash could take back. The round after
is planned on what committed and handed to SQLite's thread just before those answers go out,
so that the thread commits it while the event loop runs the answered handlers
(``Writer._run``).

A request is planned against a scratch copy of the job states; a request that fails its own
checks (unknown job, closed log, oversize event) is refused alone and leaves nothing behind,
while the others in its group go on. A failed commit refuses the whole group with
``StorageUnavailable`` and leaves the in-memory state as it was before the group.

A storage fault (disk full, file not writable, locked by another process, I/O error) makes the
writer unhealthy until a commit succeeds again. Appends keep trying, and while none arrives the
writer itself commits a small probe transaction every ``probe_seconds``, so an idle server
becomes ready again by itself once the fault clears. A fault is logged once when it starts
(``storage_failed``) and once when it ends (``storage_recovered``), not once per request.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiosqlite
import orjson
import structlog

from .errors import (
    CommitOutcomeUnknown,
    EventTooLarge,
    InvalidJson,
    JobExists,
    JobFinished,
    JobNotFound,
    Overloaded,
    ServiceError,
    ShuttingDown,
    StorageUnavailable,
    ValidationFailed,
)
from .frames import Frame
from .hub import Hub
from .job_states import JobCache
from .metrics import GROUP_EVENTS_BUCKETS, Histogram
from .models import EventIn
from .snapshot import (
    CountsOutOfRange,
    Fold,
    JobState,
    apply_event,
    exact_bytes,
    progress_in_context,
)
from .tenancy import JobKey
from .wal import WalBound

log = structlog.get_logger("jobfeed.writer")

# SQLite's default limit on host parameters is 32766; stay well inside it.
_MAX_PARAMS = 30_000

T = TypeVar("T")


def load_states_sql(pairs: int) -> str:
    """Snapshots of ``pairs`` (tenant, job_id) pairs. A join from the wanted pairs (CROSS
    JOIN keeps that order) searches UNIQUE (tenant, job_id) once per pair."""
    values = ",".join("(?,?)" for _ in range(pairs))
    return (
        f"WITH wanted(tenant, job_id) AS (VALUES {values}) "
        "SELECT j.tenant, j.job_id, j.snapshot FROM wanted CROSS JOIN jobs AS j "
        "ON j.tenant = wanted.tenant AND j.job_id = wanted.job_id"
    )


def load_keys_sql(triples: int) -> str:
    """Stored events of ``triples`` (tenant, job_id, key) idempotency keys. As above, the
    join searches the partial key index per triple; `(..., key) IN (VALUES ...)` scans the
    log."""
    values = ",".join("(?,?,?)" for _ in range(triples))
    return (
        f"WITH wanted(tenant, job_id, key) AS (VALUES {values}) "
        "SELECT e.tenant, e.job_id, e.key, e.seq, e.id, e.ts"
        " FROM wanted CROSS JOIN events AS e"
        " ON e.tenant = wanted.tenant AND e.job_id = wanted.job_id AND e.key = wanted.key"
        " WHERE e.key IS NOT NULL"
    )


INSERT_EVENT_SQL = (
    "INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

INSERT_JOB_SQL = (
    "INSERT INTO jobs (tenant, job_id, kind, status, last_seq, created_at, updated_at,"
    " finished_at, snapshot, heartbeat_timeout) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

UPDATE_JOB_SQL = (
    "UPDATE jobs SET status = ?, last_seq = ?, updated_at = ?, finished_at = ?,"
    " snapshot = ? WHERE tenant = ? AND job_id = ?"
)


@dataclass(frozen=True, slots=True)
class AppendedEvent:
    seq: int
    id: int
    ts: str
    duplicate: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "id": self.id, "ts": self.ts}
        if self.duplicate:
            out["duplicate"] = True
        return out


@dataclass(frozen=True, slots=True)
class AppendResult:
    job_id: str
    last_seq: int
    events: list[AppendedEvent]
    # Every event was a retry of a stored key (answered 200, not 201). Set by the writer,
    # which knows it, rather than counted again from ``events`` for every answer.
    all_duplicates: bool = False


@dataclass(frozen=True, slots=True)
class Fence:
    """A conditional ``failed`` for the watchdog (``server.watchdog``): fail the job with
    ``worker_lost`` only if its log still ends at ``last_seq``, as the writer sees it when
    the group is planned. An event that committed since (in an earlier group, or earlier in
    the same one) makes the fence a no-op: the decision "no event since" is never taken on a
    stale read."""

    key: JobKey
    epoch: str | None  # the log's identity: a job deleted and created again is not fenced
    last_seq: int
    message: str


@dataclass(frozen=True, slots=True)
class FenceOutcome:
    """What a ``Fence`` did: ``failed`` is the event appended (None: the job had moved on),
    ``state`` the job's state after it (None: there is no such job, e.g. deleted)."""

    failed: AppendedEvent | None
    state: JobState | None


@dataclass(slots=True)
class _Op:
    key: JobKey
    future: asyncio.Future[Any]
    # For an append: the validated events. For a create: None, with kind, metadata and
    # heartbeat_timeout. For the watchdog: fences (and ``key`` is the first one's job).
    events: list[EventIn] | None = None
    kind: str | None = None
    metadata: dict[str, Any] | None = None
    heartbeat_timeout: float | None = None
    fences: list[Fence] | None = None
    # Work run alone between two groups (a deletion, a vacuum step): ``run_exclusive``.
    exclusive: Callable[[], Awaitable[Any]] | None = None

    @property
    def weight(self) -> int:
        if self.fences is not None:
            return len(self.fences)
        return 1 if self.events is None else len(self.events)

    @property
    def keys(self) -> Iterable[JobKey]:
        return (self.key,) if self.fences is None else (fence.key for fence in self.fences)


@dataclass(slots=True)
class _Group:
    """What one round will write, built up request by request."""

    states: dict[JobKey, JobState | None]
    created: list[JobKey] = field(default_factory=list)  # in request order: job_no follows it
    touched: dict[JobKey, JobState] = field(default_factory=dict)
    event_rows: list[tuple[int, str, str, int, str, str, str | None, str]] = field(
        default_factory=list
    )
    frames: dict[JobKey, list[Frame]] = field(default_factory=dict)
    # The same frames in id order, for the feed (ids are handed out in request order).
    feed: list[Frame] = field(default_factory=list)
    keys: dict[tuple[JobKey, str], AppendedEvent] = field(default_factory=dict)
    answers: list[tuple[_Op, Any]] = field(default_factory=list)
    # Appends fold into one Fold per job for the whole group: a pipelining producer's
    # thousand single-event requests build the job's state once, in ``settle``, not once each.
    folds: dict[JobKey, Fold] = field(default_factory=dict)

    def settle(self) -> None:
        """Put the state each fold stands for in ``states`` and ``touched``: before anything
        reads ``states`` other than an append (a fence), and once planning ends."""
        for key, fold in self.folds.items():
            if fold.changed:
                state = fold.result()
                self.states[key] = state
                self.touched[key] = state
        self.folds.clear()


@dataclass(slots=True)
class _Flight:
    """A group planned and handed to the SQLite thread, not yet answered."""

    ops: list[_Op]
    weight: int
    group: _Group
    ts: str
    next_id: int  # the next event id once this group is committed
    before: dict[JobKey, str]  # job statuses before the group, for jobs_by_status
    started: float  # perf_counter when it was taken from the queue
    write: asyncio.Future[None] | None = None  # None: nothing to write


class _CommitFailed(Exception):
    """COMMIT itself failed: SQLite rolled back, but the frames may be in the -wal file."""

    def __init__(self, error: sqlite3.Error) -> None:
        super().__init__(str(error))
        self.error = error


def _filled(answers: list[AppendedEvent | None]) -> list[AppendedEvent]:
    """A request's answers once every event has one (stored before, or appended now)."""
    filled = [answer for answer in answers if answer is not None]
    assert len(filled) == len(answers), "an event of the request was neither stored nor new"
    return filled


def _rollback_in_thread(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        # After SQLITE_FULL / IOERR / BUSY SQLite may have rolled back already.
        log.debug("rollback_failed")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Writer:
    def __init__(
        self,
        conn: aiosqlite.Connection,
        hub: Hub,
        *,
        max_batch_events: int,
        max_pending: int,
        max_event_bytes: int,
        job_cache_size: int,
        job_cache_bytes: int,
        probe_seconds: float = 1.0,
        wal: WalBound | None = None,
        busy_timeout_ms: int = 5_000,
        epoch_suffix: str = "",
    ) -> None:
        self._conn = conn
        # Ends the epoch of every job created here (server.generation: "" until a restore).
        self._epoch_suffix = epoch_suffix
        self._hub = hub
        self._max_batch_events = max_batch_events
        self._max_pending = max_pending
        self._max_event_bytes = max_event_bytes
        self._probe_seconds = probe_seconds
        self._wal = wal
        self._busy_timeout_ms = busy_timeout_ms
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._pending_weight = 0
        # For /metrics (server/metrics.py): moved in place, read when scraped.
        self.group_events = Histogram(GROUP_EVENTS_BUCKETS)
        self.faults = 0
        self._jobs = JobCache(job_cache_size, job_cache_bytes)
        # Called after each commit with the job states it wrote and the monotonic time of the
        # commit (the watchdog's schedule, ``server.watchdog``); None: nobody watches.
        self.on_commit: Callable[[Mapping[JobKey, JobState], float], None] | None = None
        # Told of each job deleted (``forget``): the watchdog stops watching it at once.
        self.on_forget: Callable[[JobKey], None] | None = None
        self._next_id = 1
        self._last_ts = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.healthy = True
        self.last_error: str | None = None
        self.commits = 0
        self.events_written = 0
        self.probes = 0  # probe transactions attempted (only while unhealthy)
        # The current outage: when it began, failed attempts, and requests refused in it.
        self._fault_since = 0.0
        self._fault_failures = 0
        self._fault_refused = 0
        # Jobs by status (GET /metrics): counted once at start, then moved by every commit
        # that creates a job or changes its status, and by every deletion.
        self.jobs_by_status: dict[str, int] = {}
        # Jobs whose row is deleted while their events are still being removed in small
        # transactions (server/deletion.py): hidden from feed replays; a create of one of
        # them first calls ``purge_leftovers`` (set by the deleter) to remove the rest.
        self.purging: set[JobKey] = set()
        self.purge_leftovers: Callable[[JobKey], Awaitable[None]] | None = None

    async def start(self) -> None:
        await self._load_position()
        await self._load_status_counts()
        await self._load_purging()
        self._hub.feed.start(self.last_id)
        if self._wal is not None:
            await self._wal.configure(self._conn)
        self._task = asyncio.create_task(self._run(), name="jobfeed-writer")

    async def _load_position(self) -> None:
        """The next event id and the newest ts, from the file."""
        # The newest event by id also has the newest ts: the writer keeps ts monotonic.
        rows = list(
            await self._conn.execute_fetchall("SELECT id, ts FROM events ORDER BY id DESC LIMIT 1")
        )
        # Deleted events' ids are never handed out again (migrations/0005_retention.sql).
        deleted = list(await self._conn.execute_fetchall("SELECT max_deleted_id FROM log_head"))
        newest = rows[0][0] if rows else 0
        self._next_id = max(newest, deleted[0][0] if deleted else 0) + 1
        self._last_ts = rows[0][1] if rows else ""

    async def _load_status_counts(self) -> None:
        """Jobs by status, counted once (the status index covers it); then kept up to date."""
        rows = await self._conn.execute_fetchall(
            "SELECT status, count(*) FROM jobs GROUP BY status"
        )
        self.jobs_by_status = {status: count for status, count in rows}

    async def _load_purging(self) -> None:
        rows = await self._conn.execute_fetchall("SELECT tenant, job_id FROM purging")
        self.purging = {JobKey(tenant, job_id) for tenant, job_id in rows}

    @property
    def connection(self) -> aiosqlite.Connection:
        """The writing connection, for ``run_exclusive`` work (server/deletion.py)."""
        return self._conn

    def committed_state(self, key: JobKey) -> JobState | None:
        """The job's state as of the last commit that touched it, when the cache holds it
        (None: ask the file). Updated right after each commit, before anything of it is
        published or acknowledged, and forgotten when the job is deleted."""
        return self._jobs.get(key)

    def forget(self, key: JobKey, status: str) -> None:
        """Job ``key`` (of ``status``) was deleted by exclusive work: drop its cached state
        and its count. Only from inside ``run_exclusive``: no group is planned meanwhile."""
        self._jobs.discard(key)
        self._count_status(status, None)
        if self.on_forget is not None:
            self.on_forget(key)

    def forget_all(self) -> None:
        """Drop every cached job state (a deletion's COMMIT failed: its outcome is unknown,
        so the next group reads each job from the file)."""
        self._jobs.clear()

    def _count_status(self, old: str | None, new: str | None) -> None:
        if old == new:
            return
        counts = self.jobs_by_status
        if old is not None:
            counts[old] = counts.get(old, 0) - 1
        if new is not None:
            counts[new] = counts.get(new, 0) + 1

    async def stop(self) -> None:
        """Commit everything already queued, then stop taking requests."""
        self._stopping = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task

    @property
    def last_id(self) -> int:
        """The id of the last committed event (0 for an empty log)."""
        return self._next_id - 1

    @property
    def pending(self) -> int:
        return self._pending_weight

    @property
    def cached_jobs(self) -> int:
        return len(self._jobs)

    @property
    def cache_bytes(self) -> int:
        """Measured bytes of the cached job states (``storage.job_cache_bytes`` bounds it)."""
        return self._jobs.bytes

    async def create_job(
        self,
        key: JobKey,
        kind: str | None,
        metadata: dict[str, Any] | None,
        heartbeat_timeout: float | None = None,
    ) -> JobState:
        return await self.submit_create(key, kind, metadata, heartbeat_timeout)

    async def fence(self, fences: list[Fence]) -> list[FenceOutcome]:
        """Append the watchdog's ``failed`` to each job whose log still ends at the fence's
        ``last_seq`` (same epoch, unfinished), in one group; per fence, what it did."""
        if not fences:
            return []
        op = self._submit(_Op(fences[0].key, self._new_future(), fences=fences))
        result: list[FenceOutcome] = await op.future
        return result

    async def append(self, key: JobKey, events: list[EventIn]) -> AppendResult:
        return await self.submit_append(key, events)

    async def run_exclusive(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` in the writer's task, alone: after the groups queued before it have
        committed and before those queued after it are planned. A deletion runs here, so an
        append either lands before it (and is deleted with the job) or is planned after it
        (and finds no job). ``work`` owns its transaction on ``connection``; it must be small,
        since appends wait behind it."""
        op = self._submit(_Op(JobKey("", ""), self._new_future(), exclusive=work))
        result: T = await op.future
        return result

    def submit_append(self, key: JobKey, events: list[EventIn]) -> asyncio.Future[AppendResult]:
        """Queue an append without waiting for it: the future settles after its group's
        commit. Requests are applied in the order they are submitted, so a producer stream
        pipelines its requests through this (``append`` awaits each). Raises ``Overloaded``
        or ``ShuttingDown`` at once, as ``append`` does."""
        return self._submit(_Op(key, self._new_future(), events=events)).future

    def submit_create(
        self,
        key: JobKey,
        kind: str | None,
        metadata: dict[str, Any] | None,
        heartbeat_timeout: float | None = None,
    ) -> asyncio.Future[JobState]:
        """``create_job`` without waiting for it (see ``submit_append``)."""
        op = _Op(
            key,
            self._new_future(),
            kind=kind,
            metadata=metadata,
            heartbeat_timeout=heartbeat_timeout,
        )
        return self._submit(op).future

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _submit(self, op: _Op) -> _Op:
        if self._stopping:
            raise ShuttingDown()
        if self._pending_weight + op.weight > self._max_pending and self._pending_weight:
            raise Overloaded(f"the writer has {self._pending_weight} events queued; retry shortly")
        self._pending_weight += op.weight
        self._queue.put_nowait(op)
        return op

    async def _run(self) -> None:
        """Take groups from the queue in request order and commit each, one at a time.

        When a group's COMMIT returns, the requests queued meanwhile are planned as the next
        group and handed to the SQLite thread before this group's answers go out: that
        thread then commits the next group while the event loop runs the answered requests'
        handlers, instead of waiting for the loop to come back to the writer after all of
        them (what each of the writer's round trips into the thread used to wait for). The
        next group is planned on committed state only, and each group is still published and
        answered only after its own commit. Exclusive work, a WAL restart, an unhealthy
        writer, a pending purge and reads of uncached state wait for the answers instead
        (``_may_overlap``, ``_plans_without_reads``).
        """
        stop_seen = False
        carried: _Op | None = None  # exclusive work met while a group was being gathered
        flight: _Flight | None = None  # handed to the SQLite thread, not yet answered
        while True:
            if flight is None:
                if carried is not None:
                    first, carried = carried, None
                elif stop_seen:
                    break
                else:
                    next_op = await self._next_op()
                    if next_op is None:
                        break
                    first = next_op
                if first.exclusive is not None:
                    try:
                        await self._run_exclusive(first, first.exclusive)
                    except Exception as exc:  # a bug: never let it kill the writer
                        self._bug([first], exc)
                    finally:
                        self._pending_weight -= first.weight
                    await self._between_groups()
                    continue
                ops, weight, stop_seen, carried = self._gather([first], first.weight)
                flight = await self._launch_guarded(ops, weight)
                if flight is None:
                    await self._between_groups()
                continue
            committed = await self._settle(flight)
            following: _Flight | None = None
            gathered: tuple[list[_Op], int] | None = None
            if committed and carried is None and not stop_seen and self._may_overlap():
                ops, weight, stop_seen, carried = self._gather([], 0)
                if ops and self._plans_without_reads(ops):
                    # Never suspends (nothing to read), so nothing else runs between the
                    # commit's cached states (``committed_state``) and its publishing.
                    following = await self._launch_guarded(ops, weight)
                elif ops:
                    gathered = ops, weight  # planned once the answers are out
            if committed:  # otherwise its requests have their failure already
                self._answer(flight)
            if gathered is not None:
                following = await self._launch_guarded(*gathered)
            flight = following
            if flight is None:
                await self._between_groups()

    def _gather(self, ops: list[_Op], weight: int) -> tuple[list[_Op], int, bool, _Op | None]:
        """Add queued requests to ``ops`` up to ``storage.max_batch_events``; also whether
        the stop marker was met, and exclusive work met (it runs alone, after the group)."""
        while weight < self._max_batch_events and not self._queue.empty():
            op = self._queue.get_nowait()
            if op is None:
                return ops, weight, True, None
            if op.exclusive is not None:
                return ops, weight, False, op
            ops.append(op)
            weight += op.weight
        return ops, weight, False, None

    def _may_overlap(self) -> bool:
        """Whether the next group may be planned and handed over before the group just
        committed is answered: requests are queued, and nothing needs the writer between
        the groups. Not while unhealthy (a group then goes alone, as the probes do), nor with
        a deleted job's leftovers to purge, nor once the WAL is due for a restart
        (``WalBound.restart_if_due`` needs no transaction open)."""
        if self._queue.empty() or not self.healthy or self.purging:
            return False
        return self._wal is None or not self._wal.restart_due()

    def _plans_without_reads(self, ops: list[_Op]) -> bool:
        """Whether ``ops`` plan from memory alone (every job's state cached, no idempotency
        key to look up): otherwise the answers of the group before do not wait for the read."""
        for op in ops:
            if op.events is not None and any(event.key is not None for event in op.events):
                return False
            if any(self._jobs.get(key) is None for key in op.keys):
                return False
        return True

    async def _between_groups(self) -> None:
        if self._wal is not None:
            # No transaction is open, and the answers are already out.
            await self._wal.restart_if_due(self._conn, self._busy_timeout_ms)

    def _bug(self, ops: list[_Op], exc: Exception) -> None:
        log.exception("writer_group_failed", ops=len(ops))
        for op in ops:
            if not op.future.done():
                op.future.set_exception(exc)

    async def _run_exclusive(self, op: _Op, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            result = await work()
        except ServiceError as exc:
            if not op.future.done():  # the caller may have been cancelled meanwhile
                op.future.set_exception(exc)
        else:
            if not op.future.done():
                op.future.set_result(result)

    async def _next_op(self) -> _Op | None:
        """The next request; while unhealthy and idle, probe the write path meanwhile."""
        while not self.healthy:
            try:
                return await asyncio.wait_for(self._queue.get(), self._probe_seconds)
            except TimeoutError:
                await self._probe()
        return await self._queue.get()

    async def _probe(self) -> None:
        """Commit one small transaction through the same connection, as an append would.

        It rewrites the one row of ``storage_probe`` and, within the same transaction, grows
        it by one event's worth of bytes and shrinks it again: a file that cannot grow by that
        much (disk full, ``max_page_count``) fails the probe as it would fail an append.
        """
        self.probes += 1
        conn = self._conn
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.execute(
                    "UPDATE storage_probe SET probed_at = ?, probes = probes + 1,"
                    " pad = zeroblob(?) WHERE id = 1",
                    (utc_now(), self._max_event_bytes),
                )
                await conn.execute("UPDATE storage_probe SET pad = NULL WHERE id = 1")
                await conn.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise
        except sqlite3.Error as exc:
            self._fault(exc, "probe", refused=0)
            return
        self._recovered("probe")

    async def _rollback(self) -> None:
        try:
            await self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            # After SQLITE_FULL / IOERR / BUSY SQLite may have rolled back already.
            log.debug("rollback_failed")

    def _fault(
        self, exc: sqlite3.Error, stage: str, refused: int, outcome: str = "not_written"
    ) -> None:
        """Record a failed write; log it only when a fault starts or changes."""
        error = f"{type(exc).__name__}: {exc}"
        self.faults += 1
        if self.healthy:
            self._fault_since = time.monotonic()
            self._fault_failures = self._fault_refused = 0
        self._fault_failures += 1
        self._fault_refused += refused
        if self.healthy or error != self.last_error:
            log.error(
                "storage_failed",
                stage=stage,
                error=error,
                sqlite_error=getattr(exc, "sqlite_errorname", None),
                refused=refused,
                outcome=outcome,
            )
        self.healthy = False
        self.last_error = error

    def _recovered(self, stage: str) -> None:
        if self.healthy:
            return
        log.info(
            "storage_recovered",
            stage=stage,
            last_error=self.last_error,
            failures=self._fault_failures,
            refused=self._fault_refused,
            seconds=round(time.monotonic() - self._fault_since, 3),
        )
        self.healthy = True
        self.last_error = None

    async def _launch_guarded(self, ops: list[_Op], weight: int) -> _Flight | None:
        try:
            flight = await self._launch(ops, weight)
        except Exception as exc:  # a bug: never let it kill the writer or hang callers
            self._bug(ops, exc)
            flight = None
        if flight is None:
            self._pending_weight -= weight
        return flight

    async def _launch(self, ops: list[_Op], weight: int) -> _Flight | None:
        """Plan ``ops`` as one group on what is committed, refuse the requests that fail
        their own checks, and hand the group's write to the SQLite thread. None: the group
        is over already (nothing to write, or its reads failed), every request answered."""
        started = time.perf_counter()
        try:
            if self.purging and self.purge_leftovers is not None:
                for op in ops:
                    creates = op.events is None and op.fences is None
                    if creates and op.key in self.purging:
                        await self.purge_leftovers(op.key)  # before the id is created again
            states = await self._load_states({key for op in ops for key in op.keys})
            stored_keys = await self._load_keys(ops)
        except sqlite3.Error as exc:
            self._fail(ops, exc, "read")
            return None
        except ServiceError as exc:  # purge_leftovers could not write (logged by it)
            for op in ops:
                if not op.future.done():
                    op.future.set_exception(exc)
            return None
        # Statuses before this group (planning writes into ``states``): for jobs_by_status.
        before = {key: state.status for key, state in states.items() if state is not None}
        group = _Group(states=states)
        ts = utc_now()
        if ts < self._last_ts:
            ts = self._last_ts  # the wall clock stepped back; keep ts monotonic in the log
        next_id = self._next_id
        for op in ops:
            try:
                if op.fences is not None:
                    next_id = self._plan_fences(group, op, ts, next_id)
                elif op.events is None:
                    next_id = self._plan_create(group, op, ts, next_id)
                else:
                    next_id = self._plan_append(group, op, stored_keys, ts, next_id)
            except ServiceError as exc:
                if not op.future.done():
                    op.future.set_exception(exc)
            except Exception as exc:  # a bug in one request must not fail its neighbours
                log.exception("plan_failed", tenant=op.key.tenant, job_id=op.key.job_id)
                if not op.future.done():
                    op.future.set_exception(exc)
        group.settle()
        flight = _Flight(ops, weight, group, ts, next_id, before, started)
        if not group.event_rows:
            self._answer(flight)  # pure retries: nothing to commit
            return None
        flight.write = self._write(group)
        return flight

    async def _settle(self, flight: _Flight) -> bool:
        """Wait for ``flight``'s commit and take its result in (next id, cached states,
        counts); on a failed write, answer its requests with the failure. True: committed,
        to be answered with ``_answer``."""
        group = flight.group
        written = [op for op, _ in group.answers]
        try:
            assert flight.write is not None
            try:
                await flight.write
            except _CommitFailed as failed:
                await self._commit_outcome_unknown(written, failed.error)
                return False
            except sqlite3.Error as exc:
                self._fail(written, exc, "commit")
                return False
            self._next_id = flight.next_id
            self._last_ts = flight.ts
            self.commits += 1
            self.events_written += len(group.event_rows)
            self.group_events.observe(len(group.event_rows))
            self._recovered("commit")
            for key, state in group.touched.items():
                self._remember(key, state)
                self._count_status(flight.before.get(key), state.status)
            return True
        except Exception as exc:  # a bug: never let it kill the writer or hang callers
            self._bug(flight.ops, exc)
            return False
        finally:
            self._pending_weight -= flight.weight

    def _answer(self, flight: _Flight) -> None:
        """Publish a committed group and answer its requests."""
        group = flight.group
        try:
            if group.event_rows:
                if self.on_commit is not None:
                    self.on_commit(group.touched, time.monotonic())
                for key, frames in group.frames.items():
                    self._hub.publish(key, frames)
                self._hub.publish_feed(group.feed)
            for op, answer in group.answers:
                if not op.future.done():
                    op.future.set_result(answer)
        except Exception as exc:  # a bug: never let it kill the writer or hang callers
            self._bug(flight.ops, exc)
        log.debug(
            "group_committed",
            ops=len(flight.ops),
            events=len(group.event_rows),
            ms=round((time.perf_counter() - flight.started) * 1000, 3),
        )

    def _fail(self, ops: Iterable[_Op], exc: sqlite3.Error, stage: str) -> None:
        refused = [op for op in ops if not op.future.done()]
        self._fault(exc, stage, refused=len(refused))
        for op in refused:
            op.future.set_exception(
                StorageUnavailable(f"the event log cannot be written right now ({exc})")
            )

    async def _commit_outcome_unknown(self, ops: Iterable[_Op], exc: sqlite3.Error) -> None:
        """After a failed COMMIT: make the file's state definite, believe only the file, and
        only then answer, saying that the outcome is unknown.

        When the WAL's fsync fails, SQLite rolls the transaction back in memory, but its
        frames, commit marker included, are already in the ``-wal`` file past the end that
        SQLite now uses: a crash before the next write would let recovery replay them, and
        an append answered 503 would be in the log. A WAL frame counts only if its checksum
        continues the chain of the frames before it (https://sqlite.org/fileformat2.html,
        "WAL file format"), and the next transaction is written at that same place (or, if
        the WAL restarts, under a new salt): so one more commit, the probe, made at once,
        before anyone is answered, leaves those frames unrecoverable. PostgreSQL's lesson
        from fsync failures is not to carry on as if nothing was written: if the probe too
        cannot be written, the state stays unknown until a later write lands (the probe
        runs again every ``probe_seconds``), and a restart in between may bring the events
        back. That is why the answer says the outcome is unknown and a retry with the same
        keys is safe: it is answered from whatever the file holds.

        Then what the writer keeps in memory is read again from the file: the next id and
        ts, and no cached job state. The hub needs nothing: it is only ever advanced after a
        commit succeeded, and the live log never moved.
        """
        refused = [op for op in ops if not op.future.done()]
        self._fault(exc, "commit", refused=len(refused), outcome="unknown")
        await self._probe()
        try:
            await self._load_position()
            await self._load_status_counts()
        except sqlite3.Error as reload_error:  # the state stays as planned before the group
            log.warning("writer_reload_failed", error=str(reload_error))
        self._jobs.clear()
        error = f"{type(exc).__name__}: {exc}"
        for op in refused:
            op.future.set_exception(CommitOutcomeUnknown(error))

    async def _load_states(self, keys: set[JobKey]) -> dict[JobKey, JobState | None]:
        states: dict[JobKey, JobState | None] = {}
        missing: list[JobKey] = []
        for key in keys:
            cached = self._jobs.get(key)
            if cached is None:
                missing.append(key)
            else:
                states[key] = cached
        step = _MAX_PARAMS // 2
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            params = [part for key in chunk for part in key]
            query = load_states_sql(len(chunk))
            for tenant, job_id, snapshot in await self._conn.execute_fetchall(query, params):
                key = JobKey(tenant, job_id)
                state = JobState.from_json(snapshot)
                states[key] = state
                self._remember(key, state)
        for key in missing:
            states.setdefault(key, None)
        return states

    async def _load_keys(self, ops: list[_Op]) -> dict[tuple[JobKey, str], AppendedEvent]:
        wanted = [
            (op.key.tenant, op.key.job_id, event.key)
            for op in ops
            if op.events is not None
            for event in op.events
            if event.key is not None
        ]
        found: dict[tuple[JobKey, str], AppendedEvent] = {}
        step = _MAX_PARAMS // 3
        for start in range(0, len(wanted), step):
            chunk = wanted[start : start + step]
            params = [part for triple in chunk for part in triple]
            rows = await self._conn.execute_fetchall(load_keys_sql(len(chunk)), params)
            for tenant, job_id, key, seq, event_id, ts in rows:
                found[(JobKey(tenant, job_id), key)] = AppendedEvent(
                    seq, event_id, ts, duplicate=True
                )
        return found

    def _plan_create(self, group: _Group, op: _Op, ts: str, next_id: int) -> int:
        key = op.key
        if group.states.get(key) is not None:
            raise JobExists(key.job_id)
        event: dict[str, Any] = {
            "job_id": key.job_id,
            "seq": 1,
            "id": next_id,
            "type": "created",
            "ts": ts,
        }
        if op.kind is not None:
            event["kind"] = op.kind
        if op.metadata is not None:
            event["metadata"] = op.metadata
        if op.heartbeat_timeout is not None:
            event["heartbeat_timeout"] = op.heartbeat_timeout
        body = self._serialize(event, 0)
        state = apply_event(None, event, self._epoch_suffix)
        group.states[key] = state
        group.touched[key] = state
        group.created.append(key)
        group.event_rows.append(
            (next_id, key.tenant, key.job_id, 1, "created", ts, None, body.decode())
        )
        frame = Frame(key.job_id, 1, next_id, "created", ts, body, op.kind, tenant=key.tenant)
        group.frames.setdefault(key, []).append(frame)
        group.feed.append(frame)
        group.answers.append((op, state))
        return next_id + 1

    def _plan_fences(self, group: _Group, op: _Op, ts: str, next_id: int) -> int:
        """The watchdog's ``failed`` events, each only if its job has not moved since the
        sweep saw it (``Fence``). Planned against ``group.states``: what is committed plus
        what earlier requests of this group will commit, so an append that reached the
        writer first always wins, and one that comes after is refused (job_finished)."""
        assert op.fences is not None
        group.settle()  # the fences read the states the appends before them have folded
        outcomes: list[FenceOutcome] = []
        for fence in op.fences:
            key = fence.key
            state = group.states.get(key)
            if (
                state is None
                or state.finished
                or state.last_seq != fence.last_seq
                or state.epoch != fence.epoch
            ):
                outcomes.append(FenceOutcome(None, state))
                continue
            seq = state.last_seq + 1
            event: dict[str, Any] = {
                "job_id": key.job_id,
                "seq": seq,
                "id": next_id,
                "type": "failed",
                "ts": ts,
                "error": {"code": "worker_lost", "message": fence.message},
                "by": "server",
            }
            # Not held to limits.max_event_bytes, which bounds what producers send: this
            # event's size is bounded by the job id's and the message's.
            body = exact_bytes(orjson.dumps(event))
            state = apply_event(state, event)
            group.states[key] = state
            group.touched[key] = state
            group.event_rows.append(
                (next_id, key.tenant, key.job_id, seq, "failed", ts, None, body.decode())
            )
            frame = Frame(
                key.job_id, seq, next_id, "failed", ts, body, state.kind, tenant=key.tenant
            )
            group.frames.setdefault(key, []).append(frame)
            group.feed.append(frame)
            outcomes.append(FenceOutcome(AppendedEvent(seq, next_id, ts), state))
            next_id += 1
        group.answers.append((op, outcomes))
        return next_id

    def _plan_append(
        self,
        group: _Group,
        op: _Op,
        stored_keys: dict[tuple[JobKey, str], AppendedEvent],
        ts: str,
        next_id: int,
    ) -> int:
        assert op.events is not None
        job = op.key
        job_id = job.job_id
        fold = group.folds.get(job)
        if fold is None:
            state = group.states.get(job)
            if state is None:
                raise JobNotFound(job_id)
            fold = Fold(state)  # kept in the group only once an event is folded in
        answers: list[AppendedEvent | None] = []
        fresh: list[tuple[int, EventIn]] = []
        for index, event in enumerate(op.events):
            stored = None
            if event.key is not None:
                stored = group.keys.get((job, event.key)) or stored_keys.get((job, event.key))
            answers.append(stored)
            if stored is None:
                fresh.append((index, event))
        if not fresh:
            # A pure retry: answered from what is stored, even after the job has finished.
            retry = AppendResult(job_id, fold.last_seq, _filled(answers), all_duplicates=True)
            group.answers.append((op, retry))
            return next_id
        rows, frames, new_keys = [], [], {}
        kind = fold.kind
        tenant = job.tenant
        before = fold.mark()
        try:
            for index, event in fresh:
                if fold.finished:
                    raise JobFinished(job_id, fold.status)
                seq = fold.last_seq + 1
                event_type = event.type
                fields = event.stored_fields()
                if event_type == "progress":
                    fields = self._progress_fields(fields, fold, index, len(op.events))
                stored_event = {
                    "job_id": job_id,
                    "seq": seq,
                    "id": next_id,
                    "type": event_type,
                    "ts": ts,
                    **fields,
                }
                body = self._serialize(stored_event, index)
                fold.apply(stored_event)
                rows.append(
                    (next_id, tenant, job_id, seq, event_type, ts, event.key, body.decode())
                )
                frames.append(
                    Frame(job_id, seq, next_id, event_type, ts, body, kind, tenant=tenant)
                )
                answers[index] = AppendedEvent(seq, next_id, ts)
                if event.key is not None:
                    # What a later request in this group with the same key will be answered.
                    new_keys[(job, event.key)] = AppendedEvent(seq, next_id, ts, True)
                next_id += 1
        except BaseException:
            fold.restore(before)  # the request is refused whole: none of its events count
            raise
        # The whole request fits: only now does it become part of the group.
        group.folds[job] = fold
        group.event_rows.extend(rows)
        group.frames.setdefault(job, []).extend(frames)
        group.feed.extend(frames)
        group.keys.update(new_keys)
        group.answers.append((op, AppendResult(job_id, fold.last_seq, _filled(answers))))
        return next_id

    @staticmethod
    def _progress_fields(
        fields: dict[str, Any], state: Fold, index: int, batch_size: int
    ) -> dict[str, Any]:
        try:
            return progress_in_context(fields, state)
        except CountsOutOfRange as exc:
            loc: list[str | int] = ["current"] if batch_size == 1 else ["events", index, "current"]
            detail = {"loc": loc, "msg": str(exc), "type": "current_over_total"}
            raise ValidationFailed("the events are not valid", [detail]) from None

    def _serialize(self, event: dict[str, Any], index: int) -> bytes:
        try:
            # Kept by the hub's frame cache, which counts len(body): keep exactly that.
            body = exact_bytes(orjson.dumps(event))
        except orjson.JSONEncodeError as exc:
            # orjson reads 1024 levels deep but writes only ~254: refuse what cannot be stored.
            raise InvalidJson(f"event {index} cannot be stored: {exc}") from None
        if len(body) > self._max_event_bytes:
            raise EventTooLarge(
                f"event {index} is {len(body)} bytes serialized; "
                f"the limit is {self._max_event_bytes} (limits.max_event_bytes)"
            )
        return body

    def _write(self, group: _Group) -> asyncio.Future[None]:
        """Hand the group's whole transaction to the connection's thread in one call: one
        hand-off there, one answer back (four round trips before, each answer queued behind
        the loop's ready callbacks). The rows are built here, on the loop."""
        event_rows = group.event_rows
        new_jobs = [
            (
                key.tenant,
                s.job_id,
                s.kind,
                s.status,
                s.last_seq,
                s.created_at,
                s.updated_at,
                s.finished_at,
                s.to_json().decode(),
                s.heartbeat_timeout,
            )
            for key in group.created
            for s in (group.touched[key],)
        ]
        created = set(group.created)
        updated = [
            (
                s.status,
                s.last_seq,
                s.updated_at,
                s.finished_at,
                s.to_json().decode(),
                key.tenant,
                key.job_id,
            )
            for key, s in group.touched.items()
            if key not in created
        ]

        def write(db: sqlite3.Connection) -> None:  # in the connection's thread
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(INSERT_EVENT_SQL, event_rows)
                if new_jobs:
                    db.executemany(INSERT_JOB_SQL, new_jobs)
                if updated:
                    db.executemany(UPDATE_JOB_SQL, updated)
            except BaseException:
                _rollback_in_thread(db)
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback_in_thread(db)
                raise _CommitFailed(exc) from exc
            except BaseException:
                _rollback_in_thread(db)
                raise

        return self._in_thread(write)

    def _in_thread(self, work: Callable[[sqlite3.Connection], None]) -> asyncio.Future[None]:
        """Queue ``work`` on the writing connection's thread now, behind whatever is queued
        there, and return the future it settles. This is aiosqlite's own ``_execute`` without
        the coroutine around it, so the work is queued at once rather than when a task first
        runs; aiosqlite has no public way (store.py's reads use ``_execute``). Written
        against aiosqlite 0.22 (constraints.txt): its ``_tx`` queue of (future, function)."""
        conn: Any = self._conn
        db: sqlite3.Connection = conn._conn  # ValueError once the connection is closed
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn._tx.put_nowait((future, functools.partial(work, db)))
        return future

    def _remember(self, key: JobKey, state: JobState) -> None:
        self._jobs.put(key, state)
