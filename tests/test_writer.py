"""The single writer: group commit, per-request atomicity, and a failed commit's clean slate.

Driven directly against a real Store on a real SQLite file; faults are real SQLite errors
(``PRAGMA max_page_count`` makes the file "full"), not mocks.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from server.config import Config
from server.errors import JobFinished, JobNotFound, StorageUnavailable, ValidationFailed
from server.hub import Hub
from server.models import CompletedIn, LogIn, ProgressIn
from server.store import HEAD_SQL, Store
from server.tenancy import JobKey
from tests.conftest import ConfigFactory


def key(job_id: str) -> JobKey:
    """The job ``job_id`` of the tenant every test here writes to."""
    return JobKey("default", job_id)


@pytest.fixture
async def store(config: Config) -> AsyncIterator[Store]:
    opened = Store(config, Hub(config.stream.cache_events_per_job, config.stream.cache_bytes))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def log_event(message: str, key: str | None = None) -> LogIn:
    return LogIn(type="log", message=message, key=key)


async def stored_seqs(store: Store, job_id: str) -> list[int]:
    frames = await store.read_after(key(job_id), 0, 100_000)
    return [frame.seq for frame in frames]


async def test_concurrent_appends_share_commits(store: Store) -> None:
    """Appends that arrive while a commit is in flight are committed together, in fewer
    transactions than requests, and every one is acknowledged with a distinct seq."""
    await store.writer.create_job(key("group"), None, None)
    commits_before = store.writer.commits
    results = await asyncio.gather(
        *(store.writer.append(key("group"), [log_event(f"m{i}")]) for i in range(300))
    )
    seqs = sorted(result.events[0].seq for result in results)
    assert seqs == list(range(2, 302))
    assert store.writer.commits - commits_before < 300
    assert await stored_seqs(store, "group") == list(range(1, 302))


async def test_a_refused_request_does_not_spoil_its_group(store: Store) -> None:
    """In one group, a request for an unknown job and one for a finished job are refused
    alone; the other requests in the same group commit."""
    await store.writer.create_job(key("open"), None, None)
    await store.writer.create_job(key("done"), None, None)
    await store.writer.append(key("done"), [CompletedIn(type="completed")])
    outcomes = await asyncio.gather(
        store.writer.append(key("open"), [log_event("a")]),
        store.writer.append(key("missing"), [log_event("b")]),
        store.writer.append(key("done"), [log_event("c")]),
        store.writer.append(key("open"), [log_event("d")]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], JobNotFound)
    assert isinstance(outcomes[2], JobFinished)
    assert await stored_seqs(store, "open") == [1, 2, 3]
    assert await stored_seqs(store, "done") == [1, 2]


async def test_a_request_refused_part_way_leaves_the_job_as_before_it(store: Store) -> None:
    """One group folds every append to a job into one state: the middle request's first
    event folds in before its second is refused (current over the total it just set), and
    the request after it sees the job as the first request left it, not a trace of the
    refused one (its phase, its total)."""
    await store.writer.create_job(key("fold"), None, None)
    commits_before = store.writer.commits
    outcomes = await asyncio.gather(
        store.writer.append(key("fold"), [ProgressIn(type="progress", current=1, total=10)]),
        store.writer.append(
            key("fold"),
            [
                ProgressIn(type="progress", phase="refused", total=3),
                ProgressIn(type="progress", current=5),
            ],
        ),
        store.writer.append(key("fold"), [ProgressIn(type="progress", current=2)]),
        return_exceptions=True,
    )
    assert store.writer.commits - commits_before == 1, "the three requests share a group"
    assert isinstance(outcomes[1], ValidationFailed)
    assert await stored_seqs(store, "fold") == [1, 2, 3]
    snapshot_json = await store.snapshot_json(key("fold"))
    assert snapshot_json is not None
    snapshot = orjson.loads(snapshot_json)
    assert (snapshot["last_seq"], snapshot["phase"]) == (3, None)
    assert (snapshot["current"], snapshot["total"], snapshot["progress"]) == (2, 10, 20.0)


async def test_job_head_from_the_writers_cache_is_the_files(store: Store) -> None:
    """``job_head`` answers from the writer's cache when it holds the job: the same status,
    last seq and epoch as the file says, through appends, the end, deletion and a new job
    under the same id (a new epoch)."""
    job = key("head")

    async def from_file() -> tuple[str, int, str | None] | None:
        rows = await store._read(HEAD_SQL, job)
        return None if not rows else (rows[0][0].decode(), rows[0][1], rows[0][2].decode())

    async def head() -> tuple[str, int, str | None] | None:
        found = await store.job_head(job)
        return None if found is None else (found.status, found.last_seq, found.epoch)

    await store.writer.create_job(job, None, None)
    assert store.writer.committed_state(job) is not None, "the cache is what is under test"
    first = await head()
    assert first == await from_file()
    await store.writer.append(job, [log_event("a"), log_event("b")])
    assert await head() == await from_file() == ("running", 3, first[2] if first else None)
    await store.writer.append(job, [CompletedIn(type="completed")])
    assert await head() == await from_file() == ("completed", 4, first[2] if first else None)
    await store.deleter.delete_job(job)
    assert await head() is None
    assert await from_file() is None
    await store.writer.create_job(job, None, None)
    again = await head()
    assert again == await from_file()
    assert again is not None
    assert first is not None
    assert again[2] != first[2]


async def test_batch_with_terminal_then_more_writes_nothing(store: Store) -> None:
    """A batch whose terminal event is followed by another is refused whole."""
    await store.writer.create_job(key("t"), None, None)
    with pytest.raises(JobFinished):
        await store.writer.append(
            key("t"),
            [
                ProgressIn(type="progress", progress=5),
                CompletedIn(type="completed"),
                log_event("after the end"),
            ],
        )
    assert await stored_seqs(store, "t") == [1]


async def _set_max_pages(store: Store, pages: int) -> None:
    conn: Any = store._writer_conn  # fault injection on the writer's own connection
    await conn.execute(f"PRAGMA max_page_count = {pages}")


async def test_full_disk_refuses_whole_group_and_recovers(store: Store) -> None:
    """When the file cannot grow, every append in the failing group gets 503
    storage_unavailable, nothing is half-written, and once space is back the log
    continues contiguously from where it was."""
    await store.writer.create_job(key("full"), None, None)
    conn: Any = store._writer_conn
    async with conn.execute("PRAGMA page_count") as cursor:
        row = await cursor.fetchone()
    await _set_max_pages(store, row[0])
    big = "x" * 30_000
    outcomes = await asyncio.gather(
        *(store.writer.append(key("full"), [log_event(big)]) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(outcome, StorageUnavailable) for outcome in outcomes), outcomes
    assert not store.writer.healthy
    assert await store.check_ready() is not None
    assert await stored_seqs(store, "full") == [1]

    await _set_max_pages(store, 1_000_000)
    result = await store.writer.append(key("full"), [log_event(big)])
    assert result.events[0].seq == 2
    assert store.writer.healthy
    assert await store.check_ready() is None
    assert await stored_seqs(store, "full") == [1, 2]


async def test_keyed_retry_in_the_same_group_is_one_copy(store: Store) -> None:
    """Two identical keyed requests that land in one group append one event; both get its
    seq, the second marked duplicate."""
    await store.writer.create_job(key("k"), None, None)
    first, second = await asyncio.gather(
        store.writer.append(key("k"), [log_event("once", key="k-1")]),
        store.writer.append(key("k"), [log_event("once", key="k-1")]),
    )
    assert first.events[0].seq == second.events[0].seq == 2
    assert [first.events[0].duplicate, second.events[0].duplicate] == [False, True]
    assert await stored_seqs(store, "k") == [1, 2]


async def test_ids_increase_across_jobs_and_restarts(make_config: ConfigFactory) -> None:
    """Event ids are strictly increasing across jobs, and keep increasing after a reopen."""
    config = make_config()
    ids: list[int] = []
    for round_ in range(2):
        store = Store(config, Hub(16, 1 << 20))
        await store.open()
        try:
            for job in ("a", "b"):
                job_id = f"{job}{round_}"
                await store.writer.create_job(key(job_id), None, None)
                result = await store.writer.append(key(job_id), [log_event("x"), log_event("y")])
                ids.extend(event.id for event in result.events)
        finally:
            await store.close()
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_sqlite_is_recent_enough_for_strict_tables() -> None:
    """STRICT tables need SQLite 3.37+; the schema relies on them."""
    assert sqlite3.sqlite_version_info >= (3, 37)


def _object_heavy_metadata(tag: int) -> dict[str, Any]:
    """~65 KB of JSON that parses into ~21,700 Python objects (about 1.5 MB of them)."""
    return {"tag": tag, "m": [{}] * 21_700}


async def test_job_cache_holds_metadata_as_bytes_not_objects(
    make_config: ConfigFactory,
) -> None:
    """A job's cached state costs about its snapshot's serialized size, and the cache's
    byte account says so: 80 jobs with object-heavy 65 KB metadata (as an HTTP body parses
    it: ~1.5 MB of Python objects each) retain under 2x their JSON, measured by tracemalloc
    (the frame caches, per job and the feed's, are off, so that only the job cache retains
    anything)."""
    config = make_config(stream__cache_events_per_job=0)
    store = Store(config, Hub(0, 0, 0, 0))
    await store.open()
    json_bytes = 80 * len(orjson.dumps(_object_heavy_metadata(0)))
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for index in range(80):
            metadata = orjson.loads(orjson.dumps(_object_heavy_metadata(index)))
            await store.writer.create_job(key(f"heavy-{index}"), None, metadata)
        del metadata
        # The writer's loop keeps its last group (and the last request's metadata) until
        # the next request arrives.
        await store.writer.create_job(key("small"), None, None)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        account = store.writer.cache_bytes
        await store.close()
    assert retained < 2 * json_bytes, f"retained {retained} bytes for {json_bytes} of JSON"
    assert json_bytes <= account < 2 * json_bytes
    # The account is the measured truth: what tracemalloc saw, give or take the writer's
    # own small bookkeeping.
    assert abs(retained - account) < 64 * 1024


async def test_job_cache_is_bounded_in_bytes(make_config: ConfigFactory) -> None:
    """With ``storage.job_cache_bytes`` = 1 MiB the writer keeps fewer jobs than
    ``job_cache_size`` allows, its own byte account stays within the bound, and a job
    evicted from the cache is appended to as before (read back from SQLite)."""
    config = make_config(storage__job_cache_bytes=1 << 20, storage__job_cache_size=10_000)
    store = Store(config, Hub(16, 1 << 20))
    await store.open()
    try:
        for index in range(60):
            await store.writer.create_job(key(f"j{index}"), None, {"blob": "y" * 60_000})
        assert 0 < store.writer.cached_jobs < 60
        assert 60_000 * store.writer.cached_jobs <= store.writer.cache_bytes <= 1 << 20
        result = await store.writer.append(key("j0"), [log_event("after eviction")])
        assert result.last_seq == 2
        snapshot = orjson.loads(await store.snapshot_json(key("j0")) or b"null")
        assert snapshot["metadata"] == {"blob": "y" * 60_000}
        assert snapshot["status"] == "running"
        assert store.writer.cache_bytes <= 1 << 20
    finally:
        await store.close()


async def test_cached_frames_hold_their_json_not_a_write_buffer(config: Config) -> None:
    """The bytes of a committed event (kept in the hub's frame cache, which counts their
    length against ``stream.cache_bytes``) take about their length: orjson's output keeps
    the whole buffer it wrote into (4 KiB for a 150-byte event), so 4,000 cached events
    took ~16 MB for ~0.6 MB counted. Measured by tracemalloc: under 4x what is counted."""
    hub = Hub(config.stream.cache_events_per_job, config.stream.cache_bytes)
    store = Store(config, hub)
    await store.open()
    try:
        await store.writer.create_job(key("small"), None, None)
        channel = hub.attach(key("small"), 1)  # keeps the job's cache while the test looks
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(40):
                await store.writer.append(key("small"), [log_event("step") for _ in range(100)])
            await store.writer.create_job(key("flush"), None, None)  # the writer drops its group
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(channel.frames) == 4001
        counted = sum(len(frame.json) for frame in channel.frames[1:])
        assert retained < 4 * counted, f"retained {retained} bytes for {counted} counted"
        hub.detach(channel)
    finally:
        await store.close()
