"""The worker-lost watchdog: a job created with a ``heartbeat_timeout`` that stays silent for
that long while unfinished is failed by the server itself (docs/operations.md).

Finding the due jobs costs the append path no database write: the schedule is in memory, a
dict of the watched unfinished jobs (their last seq, when their last event committed, their
timeout) and a heap of deadlines, loaded at start from the ``jobs_watched`` index (migration
0006) and kept current by the writer, which reports every commit (``Writer.on_commit``: one
dict update per watched job touched by a group). The heap is lazy: an event does not move a
job's heap entry; when the entry comes due, the sweep looks at the job's latest event and
pushes the entry back to its real deadline if it has one. So an event costs O(1), and a heap
operation happens once per timeout period per job at most.

The decision "no event since the sweep looked" is not taken here: each due job becomes a
``Fence`` (fail it if its log still ends at this seq), which the writer checks against its
own state in the group it commits the ``failed`` event in (``Writer._plan_fences``). An append
that reached the writer first wins; one that comes after gets 409 ``job_finished``.

Many jobs due at once (a worker pool dies) are failed ``watchdog.batch_jobs`` per
transaction, one transaction after another, so appends get the writer between them.

After a restart a job's worker may still be alive, its appends refused while the server was
down: every watched job loaded at start gets a full timeout from the start before it can be
failed, however long it was silent before (its log line still says how long).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import aiosqlite
import structlog

from .config import WatchdogConfig
from .errors import ServiceError
from .snapshot import JobState
from .tenancy import JobKey
from .writer import Fence, Writer

log = structlog.get_logger("jobfeed.watchdog")

# The unfinished watched jobs; the WHERE implies the partial index's (tests check the plan).
LOAD_WATCHED_SQL = (
    "SELECT tenant, job_id, last_seq, updated_at, heartbeat_timeout,"
    " json_extract(snapshot, '$.epoch') FROM jobs"
    " WHERE heartbeat_timeout IS NOT NULL AND status IN ('queued', 'running')"
)


# Stale heap entries tolerated beyond twice the live ones before the heap is rebuilt.
_COMPACT_SLACK = 1024


@dataclass(slots=True)
class _Watched:
    """One watched unfinished job, as the last commit left it."""

    epoch: str | None  # a job deleted and created again is another job
    last_seq: int
    seen: float  # monotonic time its last event committed (estimated from updated_at at load)
    timeout: float
    not_before: float  # monotonic: never failed earlier (a timeout from start, when loaded)
    scheduled: float  # the deadline of this job's entry in the heap (older entries are stale)

    @property
    def deadline(self) -> float:
        return max(self.seen + self.timeout, self.not_before)


class Watchdog:
    """The schedule (``load``, ``note_commit``) and the sweep task (``start``, ``stop``)."""

    def __init__(
        self,
        writer: Writer,
        config: WatchdogConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writer = writer
        self._interval = config.interval_seconds
        self._batch_jobs = config.batch_jobs
        self._clock = clock
        self._jobs: dict[JobKey, _Watched] = {}
        self._heap: list[tuple[float, JobKey]] = []
        self._task: asyncio.Task[None] | None = None
        self._failing: str | None = None  # the error code of the fence ops failing now
        # For /metrics and the tests.
        self.lost = 0  # jobs failed as worker_lost
        self.fence_groups = 0  # writer operations submitted (each one transaction at most)

    @property
    def watched(self) -> int:
        """Unfinished jobs with a timeout (deleted ones count until their deadline)."""
        return len(self._jobs)

    def next_deadline(self, key: JobKey) -> float | None:
        """When ``key`` can be failed at the earliest (monotonic), if it is watched."""
        watched = self._jobs.get(key)
        return None if watched is None else watched.deadline

    async def load(self, conn: aiosqlite.Connection) -> int:
        """Schedule every unfinished watched job in the file; the number of them."""
        rows = list(await conn.execute_fetchall(LOAD_WATCHED_SQL))
        now = self._clock()
        wall = datetime.now(UTC)
        for tenant, job_id, last_seq, updated_at, timeout, epoch in rows:
            key = JobKey(tenant, job_id)
            if key in self._jobs:
                continue
            silent = max(0.0, (wall - datetime.fromisoformat(updated_at)).total_seconds())
            watched = _Watched(epoch, last_seq, now - silent, timeout, now + timeout, 0.0)
            watched.scheduled = watched.deadline
            self._jobs[key] = watched
            self._heap.append((watched.scheduled, key))
        heapq.heapify(self._heap)
        return len(rows)

    def note_commit(self, touched: Mapping[JobKey, JobState], now: float) -> None:
        """``Writer.on_commit``: the states a group committed, at ``now`` (monotonic)."""
        jobs = self._jobs
        for key, state in touched.items():
            timeout = state.heartbeat_timeout
            if timeout is None:
                continue
            if state.finished:
                jobs.pop(key, None)
                continue
            watched = jobs.get(key)
            if watched is None or watched.epoch != state.epoch:
                watched = _Watched(state.epoch, state.last_seq, now, timeout, 0.0, now + timeout)
                jobs[key] = watched
                heapq.heappush(self._heap, (watched.scheduled, key))
            else:
                watched.last_seq = state.last_seq
                watched.seen = now

    def forget(self, key: JobKey) -> None:
        """``Writer.on_forget``: the job was deleted; its heap entry is skipped when due."""
        self._jobs.pop(key, None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="jobfeed-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sweep()
            except Exception:  # a bug: logged, and the next sweep tries again
                log.exception("watchdog_sweep_failed")

    def _due(self, now: float) -> list[tuple[JobKey, _Watched]]:
        """Pop every heap entry due by ``now``: the jobs silent for their timeout; the
        others' entries go back at their real deadlines."""
        heap, jobs = self._heap, self._jobs
        due: list[tuple[JobKey, _Watched]] = []
        while heap and heap[0][0] <= now:
            deadline, key = heapq.heappop(heap)
            watched = jobs.get(key)
            if watched is None or watched.scheduled != deadline:
                continue  # finished, or rescheduled since: a stale entry
            if watched.deadline > now:
                watched.scheduled = watched.deadline
                heapq.heappush(heap, (watched.scheduled, key))
            else:
                due.append((key, watched))
        return due

    @property
    def heap_entries(self) -> int:
        return len(self._heap)

    def _compact(self) -> None:
        """Drop the stale heap entries (of jobs finished or replaced) once they outnumber the
        live ones: a job that finishes leaves its entry until its deadline, and many short
        jobs with long timeouts would otherwise keep millions of them."""
        if len(self._heap) > 2 * len(self._jobs) + _COMPACT_SLACK:
            self._heap = [(watched.scheduled, key) for key, watched in self._jobs.items()]
            heapq.heapify(self._heap)

    async def sweep(self) -> int:
        """Fail every job due now, ``batch_jobs`` per writer operation; the number failed."""
        self._compact()
        now = self._clock()
        due = self._due(now)
        failed = 0
        for start in range(0, len(due), self._batch_jobs):
            failed += await self._fence(due[start : start + self._batch_jobs], now)
        return failed

    async def _fence(self, chunk: list[tuple[JobKey, _Watched]], now: float) -> int:
        fences = [
            Fence(
                key,
                watched.epoch,
                watched.last_seq,
                f"no event for {now - watched.seen:.1f} s (heartbeat_timeout "
                f"{watched.timeout:g} s): the worker is presumed lost",
            )
            for key, watched in chunk
        ]
        self.fence_groups += 1
        started = time.perf_counter()
        try:
            outcomes = await self._writer.fence(fences)
        except ServiceError as exc:  # overloaded, storage fault, shutting down: next sweep
            if exc.code != self._failing:  # once per kind of failure, not once a sweep
                log.warning("watchdog_fence_failed", jobs=len(fences), code=exc.code)
            self._failing = exc.code
            for key, watched in chunk:
                self._reschedule(key, watched)
            return 0
        self._failing = None
        failed = 0
        for (key, watched), fence, outcome in zip(chunk, fences, outcomes, strict=True):
            if outcome.failed is not None:
                failed += 1
                log.warning(
                    "worker_lost",
                    tenant=key.tenant,
                    job_id=key.job_id,
                    silent_seconds=round(now - watched.seen, 3),
                    heartbeat_timeout=watched.timeout,
                    last_seq=fence.last_seq,
                )
            else:
                self._resync(key, watched, outcome.state, now)
        self.lost += failed
        log.debug(
            "watchdog_fenced",
            jobs=len(fences),
            failed=failed,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return failed

    def _resync(self, key: JobKey, watched: _Watched, state: JobState | None, now: float) -> None:
        """After a fence that found the job moved on: watch on from what the writer holds.
        Normally an event came first and ``note_commit`` has already moved the entry; a job
        that is gone, or a change the schedule never saw (a commit whose outcome was unknown
        and that did land), is taken from ``state``."""
        if self._jobs.get(key) is not watched:
            return  # finished, or replaced by a new job under the same id: already handled
        if state is None or state.finished or state.heartbeat_timeout is None:
            del self._jobs[key]
            return
        if state.epoch != watched.epoch or state.last_seq != watched.last_seq:
            # Moved without our seeing when: count the silence from now.
            watched = _Watched(state.epoch, state.last_seq, now, state.heartbeat_timeout, 0.0, 0.0)
            self._jobs[key] = watched
        self._reschedule(key, watched)

    def _reschedule(self, key: JobKey, watched: _Watched) -> None:
        if self._jobs.get(key) is watched:
            watched.scheduled = watched.deadline
            heapq.heappush(self._heap, (watched.scheduled, key))
