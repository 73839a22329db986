"""server.pages against a real Store on a real SQLite file: replay pages shared, and kept
only when full."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.config import Config
from server.follow import Cursor, JobReader, follow
from server.frames import Frame
from server.hub import Hub
from server.models import LogIn
from server.pages import SharedPages
from server.store import Store
from server.tenancy import JobKey

JOB = JobKey("default", "job-1")
WAIT = 10.0


@pytest.fixture
async def store(config: Config) -> AsyncIterator[Store]:
    opened = Store(config, Hub(16, 1 << 20))
    await opened.open()
    try:
        await opened.writer.create_job(JOB, None, None)
        await opened.writer.append(JOB, [LogIn(type="log", message=f"{n}") for n in range(49)])
        yield opened
    finally:
        await opened.close()


def seqs(frames: list[Frame]) -> list[int]:
    return [frame.seq for frame in frames]


async def test_concurrent_reads_of_a_page_share_one_read(store: Store) -> None:
    """Cursors asking for the same page at the same time get what each would have read, from
    one read of SQLite; a full page is then served from memory."""
    pages = SharedPages(1 << 20)
    expected = seqs(await store.read_after(JOB, 10, 10))
    results = await asyncio.gather(
        *(pages.read(store, JOB, "e", 10, 10, 1 << 20) for _ in range(5))
    )
    assert [seqs(frames) for frames in results] == [expected] * 5
    assert pages.reads == 1
    assert seqs(await pages.read(store, JOB, "e", 10, 10, 1 << 20)) == expected
    assert pages.reads == 1
    assert pages.shared == 50  # four waiters and one later cursor, ten frames each


async def test_a_short_page_is_not_kept(store: Store) -> None:
    """The end of the log is read again by a later cursor: more may have been committed."""
    pages = SharedPages(1 << 20)
    assert seqs(await pages.read(store, JOB, "e", 45, 10, 1 << 20)) == [46, 47, 48, 49, 50]
    await store.writer.append(JOB, [LogIn(type="log", message="late")])
    assert seqs(await pages.read(store, JOB, "e", 45, 10, 1 << 20)) == [46, 47, 48, 49, 50, 51]
    assert pages.reads == 2


async def test_other_epoch_or_job_is_another_page(store: Store) -> None:
    """A page is the same page only for the same job, log epoch, offset and size."""
    pages = SharedPages(1 << 20)
    await pages.read(store, JOB, "e1", 0, 10, 1 << 20)
    await pages.read(store, JOB, "e2", 0, 10, 1 << 20)
    await pages.read(store, JOB, "e1", 0, 9, 1 << 20)
    assert pages.reads == 3


async def test_kept_pages_stay_within_their_bytes(store: Store) -> None:
    """Least recently used pages are dropped to stay within max_bytes."""
    one_page = sum(len(f.json) + 200 for f in await store.read_after(JOB, 0, 10))
    pages = SharedPages(2 * one_page + one_page // 2)
    for after in (0, 10, 20):
        await pages.read(store, JOB, "e", after, 10, 1 << 20)
    assert pages.bytes <= pages.max_bytes
    await pages.read(store, JOB, "e", 0, 10, 1 << 20)  # the oldest: dropped, read again
    assert pages.reads == 4


async def test_a_reader_that_goes_away_leaves_the_others_their_page(store: Store) -> None:
    """The cursor that started a shared read is cancelled (its client left): the cursors
    waiting for the same page still get it."""
    pages = SharedPages(1 << 20)
    first = asyncio.create_task(pages.read(store, JOB, "e", 0, 10, 1 << 20))
    await asyncio.sleep(0)  # the first read is under way
    waiters = [asyncio.create_task(pages.read(store, JOB, "e", 0, 10, 1 << 20)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    results = await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
    assert [seqs(frames) for frames in results] == [list(range(1, 11))] * 3
    assert first.cancelled()
    assert (pages.reads, pages.shared) == (1, 0)  # they waited for it, then read themselves


async def test_concurrent_cursors_replay_the_whole_log_once_each(config: Config) -> None:
    """Several cursors of one job replaying from 0 with small pages: each gets every event
    once, in order, and the pages they share are read from SQLite fewer times than pages
    are sent."""
    hub = Hub(0, 0)  # no frame cache: every step reads a page
    store = Store(config, hub)
    await store.open()
    try:
        await store.writer.create_job(JOB, None, None)
        for _ in range(4):
            await store.writer.append(JOB, [LogIn(type="log", message="m")] * 50)
        head = await store.job_head(JOB)
        assert head is not None

        async def replay() -> list[int]:
            cursor = Cursor(JOB, 0)
            got: list[int] = []
            reader = JobReader(store, hub, cursor, head, page_events=20, page_bytes=1 << 20)
            async for batch in follow(reader, idle_seconds=0.2):
                if batch is None:
                    break  # idle at the end of the log
                got.extend(seqs(batch))
            return got

        results = await asyncio.wait_for(asyncio.gather(*(replay() for _ in range(5))), WAIT)
        assert results == [list(range(1, 202))] * 5
        assert hub.pages.reads < 5 * 11
        assert hub.pages.shared > 0
    finally:
        await store.close()
