"""server.follow against a real Store on a real SQLite file: replay, cache, live, the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from server.config import Config
from server.follow import Cursor, JobReader, StreamClosing, follow
from server.frames import Frame
from server.hub import Hub
from server.models import CompletedIn, LogIn
from server.store import JobHead, Store
from server.tenancy import JobKey
from tests.conftest import ConfigFactory


def key(job_id: str) -> JobKey:
    """The job ``job_id`` of the tenant every test here writes to."""
    return JobKey("default", job_id)


JOB = "job-1"
WAIT = 10.0  # generous bound on any single wait; a healthy run takes milliseconds


@dataclass
class Feed:
    config: Config
    hub: Hub
    store: Store

    async def head(self, job_id: str = JOB) -> JobHead:
        head = await self.store.job_head(key(job_id))
        assert head is not None
        return head

    async def create(self, job_id: str = JOB) -> None:
        await self.store.writer.create_job(key(job_id), None, None)

    async def log(self, count: int, job_id: str = JOB) -> int:
        """Append ``count`` log events in one request; the new last_seq."""
        events = [LogIn(type="log", message=f"line {n}") for n in range(count)]
        result = await self.store.writer.append(key(job_id), list(events))
        return result.last_seq

    async def complete(self, job_id: str = JOB) -> int:
        result = await self.store.writer.append(key(job_id), [CompletedIn(type="completed")])
        return result.last_seq

    def follow(
        self,
        cursor: Cursor,
        head: JobHead,
        *,
        page_events: int = 500,
        page_bytes: int = 1 << 20,
        idle_seconds: float = 60,
        channel_mark: int | None = None,
    ) -> AsyncGenerator[list[Frame] | None, None]:
        reader = self.reader(cursor, head, channel_mark, page_events, page_bytes)
        return follow(reader, idle_seconds=idle_seconds)

    def reader(
        self,
        cursor: Cursor,
        head: JobHead,
        channel_mark: int | None = None,
        page_events: int = 500,
        page_bytes: int = 1 << 20,
    ) -> JobReader:
        return JobReader(
            self.store,
            self.hub,
            cursor,
            head,
            page_events=page_events,
            page_bytes=page_bytes,
            channel_mark=channel_mark,
        )


FeedFactory = Callable[..., Awaitable[Feed]]


@pytest.fixture
async def make_feed(make_config: ConfigFactory) -> AsyncIterator[FeedFactory]:
    """Opens Hub + Store as server/app.py does (``section__key`` config overrides)."""
    opened: list[Store] = []

    async def factory(**overrides: Any) -> Feed:
        config = make_config(**overrides)
        hub = Hub(config.stream.cache_events_per_job, config.stream.cache_bytes)
        store = Store(config, hub)
        await store.open()
        opened.append(store)
        return Feed(config, hub, store)

    yield factory
    for store in reversed(opened):
        await store.close()


async def next_batch(batches: AsyncIterator[list[Frame] | None]) -> list[Frame] | None:
    async with asyncio.timeout(WAIT):
        return await anext(batches)


class Parked(Cursor):
    """A cursor that parks on a socket taking every push (``JobChannel.park``): records
    the seqs pushed; ``woken`` and ``idled`` are set when the channel calls it back (it
    answers ``idle`` with a heartbeat of its own and stays parked)."""

    __slots__ = ("idled", "pushed", "woken")

    def __init__(self, after: int) -> None:
        super().__init__(key(JOB), after)
        self.pushed: list[int] = []
        self.woken = asyncio.Event()
        self.idled = asyncio.Event()

    def push(self, frames: list[Frame]) -> bool:
        self.pushed.extend(f.seq for f in frames)
        return True

    def wake(self) -> None:
        self.woken.set()

    def idle(self) -> bool:
        self.idled.set()
        return True


async def drain(batches: AsyncIterator[list[Frame] | None]) -> list[list[Frame]]:
    """Every batch until the cursor ends; a heartbeat (None) here fails the test."""
    out: list[list[Frame]] = []
    async with asyncio.timeout(WAIT):
        async for batch in batches:
            assert batch is not None, "heartbeat while events were due"
            out.append(batch)
    return out


def seqs(batches: list[list[Frame]]) -> list[int]:
    return [frame.seq for batch in batches for frame in batch]


async def test_replays_from_sqlite_when_caching_is_off(make_feed: FeedFactory) -> None:
    """With stream.cache_events_per_job = 0 the replay is read from SQLite, in order."""
    feed = await make_feed(stream__cache_events_per_job=0)
    await feed.create()
    await feed.log(10)
    last = await feed.complete()
    stored = await feed.store.read_after(key(JOB), 3, 100)
    batches = await drain(feed.follow(Cursor(key(JOB), 3), await feed.head()))
    assert seqs(batches) == list(range(4, last + 1))
    assert [f.json for b in batches for f in b] == [f.json for f in stored]


async def test_replays_from_sqlite_when_the_cache_is_cold(make_feed: FeedFactory) -> None:
    """A process that did not write the log (empty hub) replays it from SQLite."""
    writer = await make_feed()
    await writer.create()
    await writer.log(5)
    last = await writer.complete()
    await writer.store.close()
    reader = await make_feed()
    batches = await drain(reader.follow(Cursor(key(JOB), 0), await reader.head()))
    assert seqs(batches) == list(range(1, last + 1))


async def test_replay_pages_are_at_most_page_events(make_feed: FeedFactory) -> None:
    """A long replay comes in pages of page_events, contiguous across pages."""
    feed = await make_feed(stream__cache_events_per_job=0)
    await feed.create()
    await feed.log(20)
    last = await feed.complete()
    batches = await drain(feed.follow(Cursor(key(JOB), 0), await feed.head(), page_events=6))
    assert all(len(batch) <= 6 for batch in batches)
    assert seqs(batches) == list(range(1, last + 1))


@pytest.mark.parametrize("cached", [False, True], ids=["sqlite", "cache"])
async def test_replay_batches_are_bounded_in_bytes(make_feed: FeedFactory, cached: bool) -> None:
    """With page_bytes, a batch (read from SQLite or taken from the cache) stops at the
    event that reaches the budget: never more than the budget plus one event, never empty,
    contiguous across batches and complete."""
    feed = await make_feed(stream__cache_events_per_job=4096 if cached else 0)
    await feed.create()
    await feed.log(30)
    last = await feed.complete()
    one = len((await feed.store.read_after(key(JOB), 1, 1))[0].json)  # a log event's size
    budget = 3 * one
    batches = await drain(feed.follow(Cursor(key(JOB), 0), await feed.head(), page_bytes=budget))
    assert all(batch for batch in batches)
    assert max(sum(len(f.json) for f in batch) for batch in batches) < budget + one + 100
    assert max(len(batch) for batch in batches) <= 4
    assert seqs(batches) == list(range(1, last + 1))


async def test_replay_from_the_cache_sends_the_cached_frames(make_feed: FeedFactory) -> None:
    """When the cache reaches back to after + 1, those very frames are sent (no SQL)."""
    feed = await make_feed()
    await feed.create()
    await feed.log(8)
    cursor = Cursor(key(JOB), 4)
    batch = await next_batch(feed.follow(cursor, await feed.head()))
    channel = feed.hub.attach(key(JOB), 0)
    assert batch is not None
    assert [f.seq for f in batch] == [5, 6, 7, 8, 9]
    assert all(sent is cached for sent, cached in zip(batch, channel.frames[4:], strict=True))
    assert cursor.after == 9


async def test_replay_crosses_from_sqlite_into_the_cache(make_feed: FeedFactory) -> None:
    """A replay that starts before the cache reads SQLite, then the cache: no hole, no
    duplicate at the seam."""
    feed = await make_feed(stream__cache_events_per_job=4)
    await feed.create()
    await feed.log(15)
    last = await feed.complete()
    batches = await drain(feed.follow(Cursor(key(JOB), 0), await feed.head(), page_events=3))
    assert seqs(batches) == list(range(1, last + 1))


async def test_continues_live_after_the_replay(make_feed: FeedFactory) -> None:
    """At the end of the log the cursor waits, then yields newly committed events."""
    feed = await make_feed()
    await feed.create()
    await feed.log(2)
    batches = feed.follow(Cursor(key(JOB), 0), await feed.head())
    replay = await next_batch(batches)
    assert replay is not None
    assert [f.seq for f in replay] == [1, 2, 3]
    waiting = asyncio.create_task(next_batch(batches))
    await feed.log(2)
    live = await waiting
    assert live is not None
    assert [f.seq for f in live] == [4, 5]
    await feed.complete()
    assert seqs(await drain(batches)) == [6]


async def test_continues_live_from_sqlite_when_caching_is_off(make_feed: FeedFactory) -> None:
    """Live events reach a cursor with caching off too (read back from SQLite)."""
    feed = await make_feed(stream__cache_events_per_job=0)
    await feed.create()
    batches = feed.follow(Cursor(key(JOB), 1), await feed.head())
    waiting = asyncio.create_task(next_batch(batches))
    await feed.log(3)
    live = await waiting
    assert live is not None
    assert [f.seq for f in live] == [2, 3, 4]
    await feed.complete()
    assert seqs(await drain(batches)) == [5]


async def test_ends_after_the_terminal_event(make_feed: FeedFactory) -> None:
    """The terminal event is the last thing yielded; then the cursor is done."""
    feed = await make_feed()
    await feed.create()
    await feed.log(1)
    last = await feed.complete()
    cursor = Cursor(key(JOB), 0)
    batches = await drain(feed.follow(cursor, await feed.head()))
    assert batches[-1][-1].terminal
    assert batches[-1][-1].seq == last
    assert cursor.done
    assert cursor.after == last
    assert cursor.sent == last


async def test_finished_job_at_its_end_ends_at_once(make_feed: FeedFactory) -> None:
    """A finished job whose whole log the subscriber has: nothing to send, done at once."""
    feed = await make_feed()
    await feed.create()
    last = await feed.complete()
    cursor = Cursor(key(JOB), last)
    assert await drain(feed.follow(cursor, await feed.head())) == []
    assert cursor.done
    assert cursor.sent == 0


async def test_yields_none_when_idle(make_feed: FeedFactory) -> None:
    """Nothing committed for idle_seconds: the cursor yields None (time for a heartbeat)
    and goes on following afterwards."""
    feed = await make_feed()
    await feed.create()
    batches = feed.follow(Cursor(key(JOB), 1), await feed.head(), idle_seconds=0.05)
    assert await next_batch(batches) is None
    waiting = asyncio.create_task(next_batch(batches))
    await feed.log(1)
    live = await waiting
    while live is None:  # a commit slower than idle_seconds lets another heartbeat pass
        live = await next_batch(batches)
    assert [f.seq for f in live] == [2]
    await feed.complete()
    assert seqs(await drain(batches)) == [3]


async def test_live_events_are_pushed_while_parked(make_feed: FeedFactory) -> None:
    """At the end of the log a reader returns an empty batch; its cursor, parked on the
    channel, gets live events through pushes (advancing with them) until one must be read:
    then it is woken, and the terminal event is read, in order after the pushed ones."""
    feed = await make_feed()
    await feed.create()
    await feed.log(2)
    cursor = Parked(0)
    reader = feed.reader(cursor, await feed.head())
    assert await reader.open()
    try:
        assert [f.seq for f in await reader.next_batch()] == [1, 2, 3]  # read, not pushed
        assert await reader.next_batch() == []
        assert reader.channel.park(cursor, 60)
        await feed.log(1)
        await feed.log(2)
        assert cursor.pushed == [4, 5, 6]
        assert (cursor.after, cursor.sent, cursor.parked) == (6, 6, True)
        assert not cursor.woken.is_set()
        await feed.complete()
        async with asyncio.timeout(WAIT):
            await cursor.woken.wait()
        assert not cursor.parked
        assert [f.seq for f in await reader.next_batch()] == [7]
        assert (cursor.after, cursor.sent, cursor.done) == (7, 7, True)
    finally:
        reader.close()


async def test_closing_a_reader_unparks_its_cursor(make_feed: FeedFactory) -> None:
    """A stream that ends while parked closes its reader: nothing is pushed to the cursor
    after, and the channel is released."""
    feed = await make_feed()
    await feed.create()
    cursor = Parked(1)
    reader = feed.reader(cursor, await feed.head())
    assert await reader.open()
    assert await reader.next_batch() == []
    channel = reader.channel
    assert channel.park(cursor, 60)
    assert (channel.subscribers, channel.live) == (1, {cursor})
    reader.close()
    assert (channel.subscribers, channel.live, cursor.parked) == (0, set(), False)
    await feed.log(1)
    assert cursor.pushed == []


async def test_pushes_hold_off_the_heartbeat(make_feed: FeedFactory) -> None:
    """A heartbeat is for a quiet stream: while pushes keep flowing, idle_seconds restarts
    at each one; once they stop, the parked cursor is called back for its heartbeat (and,
    having sent it, stays parked)."""
    feed = await make_feed()
    await feed.create()
    idle = 1.0
    cursor = Parked(1)
    reader = feed.reader(cursor, await feed.head())
    assert await reader.open()
    try:
        assert await reader.next_batch() == []
        assert reader.channel.park(cursor, idle)
        idled = asyncio.create_task(cursor.idled.wait())
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Pushes every idle/10 for twice idle_seconds: the stream is never idle that long.
        while loop.time() - started < 2 * idle:
            await feed.log(1)
            assert not idled.done(), "heartbeat while events were being pushed"
            await asyncio.wait({idled}, timeout=idle / 10)
        assert len(cursor.pushed) >= 10
        async with asyncio.timeout(WAIT):
            await idled  # quiet now: the heartbeat
        assert cursor.parked
        assert not cursor.woken.is_set()
    finally:
        reader.close()


async def test_raises_stream_closing_on_hub_close(make_feed: FeedFactory) -> None:
    """hub.close() wakes a waiting cursor with StreamClosing and releases its channel."""
    feed = await make_feed()
    await feed.create()
    batches = feed.follow(Cursor(key(JOB), 1), await feed.head())
    asyncio.get_running_loop().call_soon(feed.hub.close)
    with pytest.raises(StreamClosing):
        await next_batch(batches)
    assert feed.hub.attach(key(JOB), 1).subscribers == 1


@pytest.mark.parametrize(
    "overrides",
    [
        # The last subscriber leaving drops a channel that caches nothing...
        pytest.param({"stream__cache_events_per_job": 0}, id="channel-left-empty"),
        # ...and the byte budget drops unsubscribed channels of other jobs.
        pytest.param({"stream__cache_bytes": 0}, id="channel-evicted"),
    ],
)
@pytest.mark.parametrize("page_events", [500, 2], ids=["one-page", "many-pages"])
@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "channel-marked"])
async def test_stale_head_still_gets_events_committed_before_attach(
    make_feed: FeedFactory, overrides: dict[str, Any], page_events: int, marked: bool
) -> None:
    """The head a handler reads before its hello may be behind by the time the cursor
    attaches. Events committed in between, while no channel held the job, still reach the
    subscriber — however many pages they take — and it still ends after the terminal
    event (no stall, no hang). With the hub's channel mark taken before the head (as the
    handlers do), the job's channel there then is gone: the cursor reads SQLite all the
    same."""
    feed = await make_feed(**overrides)
    await feed.create()
    await feed.create("other")
    mark = feed.hub.channels_opened if marked else None
    stale = await feed.head()  # a subscriber reads the head: last_seq 1, queued
    # Meanwhile another subscriber follows the job to its end and leaves...
    other = feed.follow(Cursor(key(JOB), 0), stale)
    first = await next_batch(other)
    assert first is not None
    assert [f.seq for f in first] == [1]
    waiting = asyncio.create_task(drain(other))
    await feed.log(5)
    last = await feed.complete()
    assert seqs(await waiting)[-1] == last
    await feed.log(1, job_id="other")  # ...and other jobs' events take the cache.
    # Only now does the first subscriber's cursor start, from its stale head.
    cursor = Cursor(key(JOB), stale.last_seq)
    followed = feed.follow(
        cursor, stale, page_events=page_events, idle_seconds=0.2, channel_mark=mark
    )
    batches = await drain(followed)
    assert seqs(batches) == list(range(2, last + 1))


async def test_a_cursor_joining_a_channel_older_than_its_head_reads_no_sqlite(
    make_feed: FeedFactory,
) -> None:
    """A reconnect storm: subscribers resume on a job whose channel was there before they
    read its head (``channel_mark``). Every commit since went through that channel, so the
    cache's end is the log's end: they replay from the cache and park without a read of
    SQLite each. Events committed later still reach them, in order."""
    feed = await make_feed()
    await feed.create()
    await feed.log(20)
    present = feed.reader(Cursor(key(JOB), 21), await feed.head())  # keeps the channel
    assert await present.open()
    mark = feed.hub.channels_opened
    head = await feed.head()
    reader = feed.reader(Cursor(key(JOB), 5), head, channel_mark=mark)
    assert await reader.open()
    assert [f.seq for f in await reader.next_batch()] == list(range(6, 22))
    assert await reader.next_batch() == []
    assert feed.hub.pages.reads == 0  # no page read, shared or not
    assert feed.hub.frames_sent.database == 0
    last = await feed.log(3)
    assert [f.seq for f in await reader.next_batch()] == list(range(22, last + 1))
    reader.close()
    present.close()


async def test_a_cursor_cancelled_mid_read_leaves_reads_fresh(make_feed: FeedFactory) -> None:
    """A subscriber that goes away while its cursor reads SQLite (a WebSocket handler
    cancels its sender) must not leave the reader connection in an open read transaction:
    the next read on it sees every acknowledged event."""
    feed = await make_feed(stream__cache_events_per_job=0, storage__read_connections=1)
    await feed.create()
    await feed.log(10)
    batches = feed.follow(Cursor(key(JOB), 0), await feed.head())
    reading = asyncio.create_task(next_batch(batches))
    # Scheduled after the task's first step, which ends waiting on its SQLite read.
    asyncio.get_running_loop().call_soon(reading.cancel)
    with pytest.raises(asyncio.CancelledError):
        await reading
    last = await feed.log(5)
    head = await feed.head()
    assert head.last_seq == last
