"""The SQLite event log: connections, migrations at open, reads, and the single writer.

One aiosqlite connection writes (``server.writer``); a small pool reads, so replays and audit
pages never wait behind a commit (WAL readers see the last committed state). WAL checkpoints
run from a separate connection on a timer instead of inside the writer's commits, which keeps
the append path's p99 flat, and the writer restarts the WAL between groups before it passes
``storage.wal_max_bytes`` (``server.wal``).

At open, before migrations, ``PRAGMA quick_check`` refuses a damaged file
(``storage.integrity_check``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import structlog

from . import migrate
from .auth import TenantGrant
from .config import Config
from .dblock import DatabaseLock
from .deletion import JobDeleter
from .feed import FeedFilter
from .frames import Frame
from .generation import Generation, read_generation
from .grants import JobGrants
from .hub import Hub
from .retention import OLDEST_EVENT_SQL, RetentionSweep, ts_seconds
from .tenancy import JobKey
from .wal import WalBound
from .watchdog import Watchdog
from .writer import Writer

log = structlog.get_logger("jobfeed.store")


# The reads, as module constants so that tests/test_tenancy_schema.py checks the query plans
# of exactly these statements. Each leads with tenant, as every index does.
SNAPSHOT_SQL = "SELECT snapshot FROM jobs WHERE tenant = ? AND job_id = ?"
HEAD_SQL = (
    "SELECT status, last_seq, json_extract(snapshot, '$.epoch') FROM jobs"
    " WHERE tenant = ? AND job_id = ?"
)
READ_AFTER_SQL = (
    "SELECT seq, id, type, ts, body FROM events WHERE tenant = ? AND job_id = ?"
    " AND seq > ? ORDER BY seq LIMIT ?"
)


def jobs_where(
    tenant: str,
    status: str | None,
    kind: str | None,
    prefix: str | None,
    before: int | None,
    grants: JobGrants | None,
) -> tuple[str, list[str | int]]:
    """The WHERE of a tenant's jobs selected by the list's filters (None: no filter), and its
    parameters: shared by the listing and the dashboard's counts."""
    clauses: list[str] = ["tenant = ?"]
    params: list[str | int] = [tenant]
    if status is not None:
        clauses.append("status = ?")
        params.append(status)
    if kind is not None:
        clauses.append("kind = ?")
        params.append(kind)
    if prefix is not None:
        clauses.append(_PREFIX_RANGE)
        params.extend(prefix_range(prefix))
    if before is not None:
        clauses.append("job_no < ?")
        params.append(before)
    if grants is not None:
        clause, grant_params = grants.sql_filter("job_id")
        clauses.append(clause)
        params.extend(grant_params)
    return " AND ".join(clauses), params


def list_jobs_sql(
    tenant: str,
    status: str | None,
    kind: str | None,
    limit: int,
    before: int | None,
    grants: JobGrants | None,
    prefix: str | None = None,
) -> tuple[str, list[str | int]]:
    """The listing query (newest first, one more row than ``limit``) and its parameters."""
    where, params = jobs_where(tenant, status, kind, prefix, before, grants)
    query = f"SELECT job_no, snapshot FROM jobs WHERE {where} ORDER BY job_no DESC LIMIT ?"
    return query, [*params, limit + 1]


class StorageCorrupt(Exception):
    """The database file is damaged or is not a SQLite database; the message is one line."""


def check_integrity(db_path: Path) -> None:
    """Refuse a damaged file before anything writes to it (``PRAGMA quick_check``).

    quick_check verifies every b-tree page and record, but not that indexes match their
    tables; it reads the whole file, so it can be turned off for huge databases.
    """
    if not db_path.exists():
        return
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        rows = conn.execute("PRAGMA quick_check(10)").fetchall()
    except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
        raise StorageCorrupt(f"{db_path}: integrity check failed: {exc}") from exc
    finally:
        conn.close()
    problems = [str(row[0]) for row in rows]
    if problems != ["ok"]:
        # A problem may span lines ("*** in database main ***\nPage 5: ..."); keep one line.
        first = " ".join(problems[0].split())
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StorageCorrupt(
            f"{db_path}: integrity check failed: {first}{more}; restore from a backup "
            "(storage.integrity_check = false skips this check)"
        )


# The id of the last committed event, as a CTE: read in the same statement as what it must be
# consistent with. MAX on the rowid is one b-tree descent.
_LAST_ID_CTE = "WITH head(last_id) AS (SELECT COALESCE(MAX(id), 0) FROM events)"


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _job_clauses(
    feed_filter: FeedFilter, *, tenant: str, job_id: str, kind: str
) -> tuple[list[str], list[str | int]]:
    """The parts of ``feed_filter`` that select jobs (the credential's grant, ids, prefix,
    kinds) as SQL on the given column expressions, with their parameters in order: the
    feed's replay (``+``-prefixed, so the id range stays the plan) and ``snapshots=1``
    (plain columns of ``jobs``) differ only in those."""
    clauses: list[str] = []
    params: list[str | int] = []
    grant = feed_filter.grant
    if isinstance(grant, TenantGrant):
        clause, grant_params = grant.sql_filter(tenant, job_id)
        clauses.append(clause)
        params.extend(grant_params)
    if feed_filter.jobs:
        clauses.append(f"{job_id} IN ({_marks(len(feed_filter.jobs))})")
        params.extend(sorted(feed_filter.jobs))
    if feed_filter.prefix is not None:
        clauses.append(f"substr({job_id}, 1, ?) = ?")
        params.extend([len(feed_filter.prefix), feed_filter.prefix])
    if feed_filter.kinds:
        clauses.append(f"{kind} IN ({_marks(len(feed_filter.kinds))})")
        params.extend(sorted(feed_filter.kinds))
    return clauses, params


def feed_query(feed_filter: FeedFilter) -> tuple[str, list[str | int]]:
    """The SQL of one feed replay step (parameters: after, upper, ``params``, limit).

    Always a primary-key range over ``events`` (``after < id <= upper``), with the filters
    tested on each row of it: the step's cost is bounded by the window, however sparse the
    filter. The unary ``+`` keeps SQLite from choosing the ``(job_id, seq)`` index for a
    ``job_id`` test, which would read every event of those jobs and sort them on every
    step; ``CROSS JOIN`` keeps ``events`` the outer loop when the job's kind is needed
    (``jobs`` is looked up by its unique ``job_id``). tests/test_feed_store.py asserts the
    plans. A credential's grant (``TenantGrant``: its tenant and job grants) is tested on
    each row too (``+``: the range stays the plan); ``FeedFilter.permitted`` checks it again
    on what the step returns.
    """
    clauses, params = _job_clauses(
        feed_filter, tenant="+e.tenant", job_id="+e.job_id", kind="j.kind"
    )
    if feed_filter.types:
        clauses.append(f"+e.type IN ({_marks(len(feed_filter.types))})")
        params.extend(sorted(feed_filter.types))
    if feed_filter.kinds:
        source = "events AS e CROSS JOIN jobs AS j ON j.tenant = e.tenant AND j.job_id = e.job_id"
        kind = "j.kind"
    else:
        source, kind = "events AS e", "NULL"
    where = "".join(f" AND {clause}" for clause in clauses)
    query = (
        f"SELECT e.id, e.job_id, e.seq, e.type, e.ts, e.body, {kind}, e.tenant FROM {source} "
        f"WHERE e.id > ? AND e.id <= ?{where} ORDER BY e.id LIMIT ?"
    )
    return query, params


@dataclass(frozen=True, slots=True)
class JobHead:
    """What a subscriber needs to start: the job's status, the end of its log and the log's
    identity (``epoch``, see ``server.snapshot.log_epoch``)."""

    status: str
    last_seq: int
    epoch: str | None = None


class Store:
    def __init__(self, config: Config, hub: Hub) -> None:
        self._config = config
        self._hub = hub
        self._writer_conn: aiosqlite.Connection | None = None
        self._checkpoint_conn: aiosqlite.Connection | None = None
        self._readers: list[aiosqlite.Connection] = []
        self._reader_turn = itertools.count()
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._writer: Writer | None = None
        self._deleter: JobDeleter | None = None
        self.retention: RetentionSweep | None = None  # while [retention] deletes anything
        self._retention_task: asyncio.Task[None] | None = None
        # The worker-lost watchdog (None with watchdog.enabled = false).
        self.watchdog: Watchdog | None = None
        self._lock = DatabaseLock(config.storage.path)
        self.wal = WalBound(config.storage.path, config.storage.wal_max_bytes)
        self.schema_version = 0
        self.generation = Generation(0, "")  # read from the file at open

    @property
    def path(self) -> str:
        return str(self._config.storage.path)

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            raise RuntimeError("store is not open")
        return self._writer

    @property
    def deleter(self) -> JobDeleter:
        if self._deleter is None:
            raise RuntimeError("store is not open")
        return self._deleter

    async def open(self) -> None:
        # First of all: nothing (not even the integrity check) touches a file in use.
        self._lock.acquire()
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        storage = self._config.storage
        if storage.integrity_check:
            await asyncio.to_thread(check_integrity, storage.path)
        applied = await asyncio.to_thread(migrate.apply_migrations, storage.path)
        if applied:
            log.info("migrations_applied", names=applied, path=self.path)
        self.schema_version = migrate.latest_version(migrate.bundled_migrations())
        self.generation = await asyncio.to_thread(_read_generation, storage.path)
        self._writer_conn = await self._connect()
        self._checkpoint_conn = await self._connect()
        for _ in range(storage.read_connections):
            reader = await self._connect(read_only=True)
            self._readers.append(reader)
        self._writer = Writer(
            self._writer_conn,
            self._hub,
            max_batch_events=storage.max_batch_events,
            max_pending=storage.max_pending_appends,
            max_event_bytes=self._config.limits.max_event_bytes,
            job_cache_size=storage.job_cache_size,
            job_cache_bytes=storage.job_cache_bytes,
            probe_seconds=storage.probe_seconds,
            wal=self.wal,
            busy_timeout_ms=storage.busy_timeout_ms,
            epoch_suffix=self.generation.job_epoch_suffix,
        )
        if self._config.watchdog.enabled:
            # Loaded before the writer runs, and told of every commit from its first one:
            # the schedule misses nothing in between.
            self.watchdog = Watchdog(self._writer, self._config.watchdog)
            watched = await self.watchdog.load(self._writer_conn)
            self._writer.on_commit = self.watchdog.note_commit
            self._writer.on_forget = self.watchdog.forget
            log.info("watchdog_loaded", watched=watched)
        await self._writer.start()
        self._deleter = JobDeleter(self._writer, self._hub)
        if self.watchdog is not None:
            self.watchdog.start()
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(), name="checkpoint")
        retention = self._config.retention
        if retention.enabled:
            self.retention = RetentionSweep(retention, self._read, self._writer, self._deleter)
            self._retention_task = asyncio.create_task(
                self.retention.run_forever(), name="retention"
            )

    async def close(self) -> None:
        """Commit what is queued, checkpoint, and close every connection (and its thread)."""
        if self._retention_task is not None:
            # Between two of its transactions, or waiting on one: the writer finishes that.
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        if self.watchdog is not None:
            await self.watchdog.stop()
        if self._writer is not None:
            await self._writer.stop()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
        if self._checkpoint_conn is not None:
            try:
                await self._checkpoint_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("final_checkpoint_failed", error=str(exc))
        for conn in [*self._readers, self._checkpoint_conn, self._writer_conn]:
            if conn is not None:
                await conn.close()
        self._readers.clear()
        self._writer_conn = self._checkpoint_conn = None
        self._lock.release()

    async def _connect(self, read_only: bool = False) -> aiosqlite.Connection:
        storage = self._config.storage
        conn = await aiosqlite.connect(storage.path, isolation_level=None)
        synchronous = "FULL" if storage.durability == "full" else "NORMAL"
        await conn.execute(f"PRAGMA busy_timeout = {storage.busy_timeout_ms}")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {synchronous}")
        # Checkpoints run from _checkpoint_loop, never inside a writer's COMMIT.
        await conn.execute("PRAGMA wal_autocheckpoint = 0")
        if read_only:
            await conn.execute("PRAGMA query_only = 1")
            # Event bodies go to sockets as bytes: skip a decode and re-encode per row.
            conn.text_factory = bytes
        return conn

    async def _read(self, query: str, params: Sequence[object]) -> list[sqlite3.Row]:
        """Run a query to completion inside a reader's thread.

        One await per read, and no cursor outlives the call: a caller cancelled mid-read
        (a client that went away) cannot leave a read transaction open on the connection,
        which would pin its view of the database to that moment.
        """
        conn = self._readers[next(self._reader_turn) % len(self._readers)]
        return list(await conn.execute_fetchall(query, params))

    async def _read_within(
        self, query: str, params: Sequence[object], size_column: int, max_bytes: int
    ) -> list[sqlite3.Row]:
        """``_read``, stopping once the rows read hold ``max_bytes`` in ``size_column``.

        Rows are taken while the ones before them hold less than ``max_bytes`` (so always at
        least one, and at most ``max_bytes`` plus one row); the rest of the query is never
        fetched, so a page of large rows is never materialised whole. Still one await, and the
        cursor is closed inside the reader's thread (see ``_read``). aiosqlite has no public
        way to run a function in its thread: ``_execute`` is what its own fetches use.
        """
        conn = self._readers[next(self._reader_turn) % len(self._readers)]

        def fetch(db: sqlite3.Connection) -> list[sqlite3.Row]:
            rows: list[sqlite3.Row] = []
            held = 0
            cursor = db.execute(query, params)
            try:
                for row in cursor:
                    rows.append(row)
                    held += len(row[size_column] or b"")  # None: an outer join's empty side
                    if held >= max_bytes:
                        break
            finally:
                cursor.close()
            return rows

        run_in_thread: Callable[..., Awaitable[list[sqlite3.Row]]] = conn._execute
        return await run_in_thread(fetch, conn._conn)

    async def _checkpoint_loop(self) -> None:
        assert self._checkpoint_conn is not None
        last_commits = -1
        failing = False
        while True:
            # On the timer, or at once when the writer is about to restart the WAL: the
            # copying is done here, off the append path, and the restart finds little left.
            wanted = self.wal.passive_wanted
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wanted.wait(), self._config.storage.checkpoint_seconds)
            commits = self.writer.commits
            if commits == last_commits and not failing and not wanted.is_set():
                continue
            wanted.clear()
            last_commits = commits
            try:
                async with self.wal.checkpoint_lock:
                    await self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    self.wal.passive_runs += 1
            except sqlite3.Error as exc:
                # Logged once per fault, not once a second: the WAL keeps every commit
                # meanwhile, and the next checkpoint that succeeds copies them all.
                if not failing:
                    log.warning("checkpoint_failed", error=f"{type(exc).__name__}: {exc}")
                failing = True
            else:
                if failing:
                    log.info("checkpoint_recovered")
                failing = False

    # -- reads ---------------------------------------------------------------------------

    async def snapshot_json(self, key: JobKey) -> bytes | None:
        rows = await self._read(SNAPSHOT_SQL, key)
        return bytes(rows[0][0]) if rows else None

    async def job_head(self, key: JobKey) -> JobHead | None:
        state = self.writer.committed_state(key)
        if state is not None:
            # No read: a reconnect storm's thousand subscribers would each make one.
            return JobHead(state.status, state.last_seq, state.epoch)
        rows = await self._read(HEAD_SQL, key)
        if not rows:
            return None
        status, last_seq, epoch = rows[0]
        # Interned: a stream holds its head for as long as it lasts, and there are five statuses.
        return JobHead(
            sys.intern(status.decode()), last_seq, None if epoch is None else epoch.decode()
        )

    async def list_jobs(
        self,
        tenant: str,
        status: str | None,
        kind: str | None,
        limit: int,
        before: int | None,
        grants: JobGrants | None = None,
        max_bytes: int | None = None,
        prefix: str | None = None,
    ) -> tuple[list[bytes], int | None, int]:
        """A tenant's snapshots newest first, only those ``grants`` cover (None: all); the
        cursor is the job_no of the last one returned; and the id of the last event committed
        when the list was read (a feed resumes from there).

        One statement, so one read transaction: the snapshots and the id are of one moment.
        With ``max_bytes`` the page ends early once its snapshots hold that many bytes
        (always at least one) and the cursor points past the last one returned; when the
        cut falls exactly at the end, the page after it is empty.
        """
        page_sql, params = list_jobs_sql(tenant, status, kind, limit, before, grants, prefix)
        query = (
            f"{_LAST_ID_CTE} SELECT head.last_id, page.job_no, page.snapshot FROM head "
            f"LEFT JOIN ({page_sql}) AS page ORDER BY page.job_no DESC"
        )
        if max_bytes is None:
            rows = await self._read(query, params)
        else:
            rows = await self._read_within(query, params, 2, max_bytes)
        last_id = int(rows[0][0])
        rows = [row for row in rows if row[1] is not None]
        page = rows[:limit]
        # A row past the page, or a page cut by the byte budget: there is (or may be) more.
        more = len(rows) > limit or (
            max_bytes is not None and sum(len(row[2]) for row in rows) >= max_bytes
        )
        next_before = page[-1][1] if page and more else None
        return [bytes(row[2]) for row in page], next_before, last_id

    async def count_jobs(
        self,
        tenant: str,
        kind: str | None,
        prefix: str | None,
        grants: JobGrants | None = None,
    ) -> dict[str, int]:
        """How many of a tenant's jobs (those ``grants`` cover; None: all) there are in each
        status (only statuses that have some), of ``kind`` and with ids starting with
        ``prefix`` when given: the dashboard's counts."""
        where, params = jobs_where(tenant, None, kind, prefix, None, grants)
        rows = await self._read(
            f"SELECT status, count(*) FROM jobs WHERE {where} GROUP BY status", params
        )
        return {bytes(row[0]).decode(): int(row[1]) for row in rows}  # text_factory: bytes

    async def feed_start(self, feed_filter: FeedFilter, max_jobs: int) -> tuple[int, list[bytes]]:
        """The log's last event id and the snapshots of the unfinished jobs that
        ``feed_filter`` selects (at most ``max_jobs + 1``), read in one statement: each
        snapshot is consistent with that id (feed.md, ``snapshots=1``)."""
        clauses, params = _job_clauses(feed_filter, tenant="tenant", job_id="job_id", kind="kind")
        clauses.insert(0, "status NOT IN ('completed', 'failed', 'cancelled')")
        query = (
            f"{_LAST_ID_CTE} SELECT head.last_id, page.job_no, page.snapshot FROM head "
            f"LEFT JOIN (SELECT job_no, snapshot FROM jobs WHERE {' AND '.join(clauses)} "
            "ORDER BY job_no LIMIT ?) AS page ORDER BY page.job_no"
        )
        rows = await self._read(query, [*params, max_jobs + 1])
        last_id = int(rows[0][0])
        return last_id, [bytes(row[2]) for row in rows if row[1] is not None]

    async def read_feed(
        self,
        after: int,
        upper: int,
        feed_filter: FeedFilter,
        limit: int,
        max_bytes: int | None = None,
    ) -> tuple[list[Frame], int]:
        """Up to ``limit`` events with ``after < id <= upper`` that ``feed_filter`` selects,
        in id order, and the position scanned: the last one's id when the page is full,
        else ``upper``. The grant is not applied here (``FeedFilter.permitted``)."""
        query, params = feed_query(feed_filter)
        if max_bytes is None:
            rows = await self._read(query, [after, upper, *params, limit])
        else:
            rows = await self._read_within(query, [after, upper, *params, limit], 5, max_bytes)
        frames = [
            Frame(
                job_id.decode(),
                seq,
                event_id,
                event_type.decode(),
                ts.decode(),
                body,
                None if kind is None else kind.decode(),
                tenant=tenant.decode(),
            )
            for event_id, job_id, seq, event_type, ts, body, kind, tenant in rows
        ]
        # A page cut by count or by bytes has scanned up to its last event only.
        cut = len(frames) >= limit or (
            max_bytes is not None and sum(frame.size for frame in frames) >= max_bytes
        )
        scanned = frames[-1].event_id if frames and cut else upper
        purging = self.writer.purging
        if purging:  # deleted jobs whose events are still being removed: never replayed
            frames = [frame for frame in frames if (frame.tenant, frame.job_id) not in purging]
        return frames, scanned

    async def read_after(
        self, key: JobKey, after: int, limit: int, max_bytes: int | None = None
    ) -> list[Frame]:
        """Up to ``limit`` events past ``after``, in order; with ``max_bytes``, only as many
        as hold that many bytes of JSON (always at least one: see ``_read_within``)."""
        params = (key.tenant, key.job_id, after, limit)
        if max_bytes is None:
            rows = await self._read(READ_AFTER_SQL, params)
        else:
            rows = await self._read_within(READ_AFTER_SQL, params, 4, max_bytes)
        tenant, job_id = key
        return [
            Frame(job_id, seq, event_id, event_type.decode(), ts.decode(), body, tenant=tenant)
            for seq, event_id, event_type, ts, body in rows
        ]

    async def oldest_event_seconds(self) -> float | None:
        """The ts of the oldest event kept, as Unix seconds (the retention horizon);
        None for an empty log. One descent of the primary key."""
        rows = await self._read(OLDEST_EVENT_SQL, ())
        return ts_seconds(bytes(rows[0][0]).decode()) if rows else None

    async def check_ready(self) -> str | None:
        """None when the log can be read and written; otherwise why not."""
        if self._writer is None or not self._readers:
            return "storage is not open"
        if not self._writer.healthy:
            return f"the log cannot be written: {self._writer.last_error}"
        try:
            await self._read("SELECT 1 FROM schema_migrations LIMIT 1", ())
        except sqlite3.Error as exc:
            return f"cannot read the database: {exc}"
        return None


# Job ids are ASCII from [A-Za-z0-9._:-] (all below 0x7f): the ids that start with a prefix
# are exactly the range [prefix, prefix + "\x7f") (LIKE would match case-insensitively).
_PREFIX_RANGE = "job_id >= ? AND job_id < ?"


def _read_generation(db_path: Path) -> Generation:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return read_generation(conn)


def prefix_range(prefix: str) -> tuple[str, str]:
    return prefix, prefix + "\x7f"
