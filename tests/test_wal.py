"""The WAL stays under ``storage.wal_max_bytes`` under steady appends with readers active.

The real Store and Writer on a real file in tmp_path, with a small bound (1 MiB) so that the
appends write many times that much WAL in a short test; replays read the log page by page
all along, so readers always hold snapshots while the writer tries to restart the WAL. The
``-wal`` file's size is sampled after every commit (each producer's append returns after
its group's commit) and by every reader after every page.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.config import Config
from server.dblock import BackupMarker
from server.hub import Hub
from server.models import LogIn
from server.store import Store
from server.tenancy import JobKey
from tests.conftest import ConfigFactory

BOUND = 1024 * 1024
# What the file may exceed the bound by: one group's frames, committed before the restart
# that follows it. Here a group is at most PRODUCERS requests of one 2 KB event: a few pages
# each for the events, their index and the job's snapshot. Stated generously.
SLACK = 256 * 1024
PRODUCERS = 4
APPENDS_PER_PRODUCER = 1_500
MESSAGE_BYTES = 2_000
READERS = 3


@pytest.fixture
async def store(make_config: ConfigFactory) -> AsyncIterator[Store]:
    config: Config = make_config(
        storage__wal_max_bytes=BOUND,
        # The background passive checkpoint runs often, as it would in a long run.
        storage__checkpoint_seconds=0.05,
    )
    opened = Store(config, Hub(16, 1 << 20))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def wal_size(db: Path) -> int:
    try:
        return os.stat(db.with_name(db.name + "-wal")).st_size
    except FileNotFoundError:
        return 0


async def test_wal_stays_under_its_bound_with_replays_in_progress(store: Store) -> None:
    """Steady appends from several producers, while readers replay the whole log page by
    page without pause: the -wal file never grows past storage.wal_max_bytes + SLACK, though
    the appends write many times the bound, and every event is in the log afterwards."""
    db = Path(store.path)
    sizes: list[int] = []
    for job in range(PRODUCERS):
        await store.writer.create_job(JobKey("default", f"j{job}"), None, None)
    done = asyncio.Event()

    async def produce(job: int) -> None:
        for index in range(APPENDS_PER_PRODUCER):
            message = f"{index:06d}" + "x" * MESSAGE_BYTES
            await store.writer.append(
                JobKey("default", f"j{job}"), [LogIn(type="log", message=message)]
            )
            sizes.append(wal_size(db))

    async def replay(reader: int) -> int:
        """Read one job's log from the start, page after page, until the producers stop."""
        pages = 0
        job = JobKey("default", f"j{reader % PRODUCERS}")
        while not done.is_set():
            after = 0
            while frames := await store.read_after(job, after, 50):
                after = frames[-1].seq
                pages += 1
                sizes.append(wal_size(db))
        return pages

    readers = [asyncio.create_task(replay(reader)) for reader in range(READERS)]
    try:
        await asyncio.gather(*(produce(job) for job in range(PRODUCERS)))
    finally:
        done.set()
        pages = await asyncio.gather(*readers)
    assert min(pages) > 0, pages
    # Every event's bytes go through the WAL at least once: a floor on what was written.
    written = PRODUCERS * APPENDS_PER_PRODUCER * MESSAGE_BYTES
    assert written > 10 * BOUND
    assert max(sizes) <= BOUND + SLACK, (
        f"the WAL reached {max(sizes)} bytes; bound {BOUND} + slack {SLACK} "
        f"(restarts {store.wal.restarts}, held up {store.wal.held_up})"
    )
    assert store.wal.restarts > 0
    for job in range(PRODUCERS):
        frames = await store.read_after(JobKey("default", f"j{job}"), 0, 10_000)
        assert [frame.seq for frame in frames] == list(range(1, APPENDS_PER_PRODUCER + 2))


async def test_a_backup_in_progress_is_not_waited_for(make_config: ConfigFactory) -> None:
    """A reader that pins the WAL while it holds the backup marker (what ``jobfeed backup``
    does during its copy) is not waited for: no restart is attempted while it lasts (none
    held up), every append succeeds and the WAL passes its bound; once it ends, the next
    restart brings the WAL back under the bound."""
    config: Config = make_config(
        storage__wal_max_bytes=BOUND,
        storage__checkpoint_seconds=0.05,
        storage__busy_timeout_ms=200,  # what an attempt that waits would cost, kept short
    )
    store = Store(config, Hub(16, 1 << 20))
    await store.open()
    db = Path(store.path)
    key = JobKey("default", "backed-up")
    try:
        await store.writer.create_job(key, None, None)
        with BackupMarker(db), contextlib.closing(sqlite3.connect(db)) as copy:
            copy.execute("BEGIN")
            copy.execute("SELECT COUNT(*) FROM events").fetchone()  # its snapshot pins the WAL
            for _ in range(1_500):
                await store.writer.append(key, [LogIn(type="log", message="x" * MESSAGE_BYTES)])
            assert wal_size(db) > BOUND
            assert store.wal.skipped_for_backup > 0
            assert store.wal.held_up == 0
            copy.execute("COMMIT")
        restarts = store.wal.restarts
        for index in range(200):
            await store.writer.append(key, [LogIn(type="log", message=f"after {index}")])
        assert store.wal.restarts > restarts
        assert wal_size(db) <= BOUND + SLACK
        frames = await store.read_after(key, 0, 10_000)
        assert [frame.seq for frame in frames] == list(range(1, 1_702))
    finally:
        await store.close()
