"""The feed's live machinery without HTTP (``server.feed.FeedChannel``): filter groups share
one evaluation per event, parked positions move over ids that do not match, and the cache
answers only for the range it holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from server.feed import FeedChannel, FeedCursor, FeedFilter, FeedLive, follow_feed
from server.frames import Frame
from server.hub import Hub
from server.models import LogIn
from server.store import Store
from server.tenancy import JobKey
from tests.conftest import ConfigFactory

WAIT = 10.0


class CountingGrant:
    """A grant that permits everything and counts how often it was asked."""

    key = "counting"
    everything = False

    def __init__(self) -> None:
        self.asked = 0

    def permits(self, frame: Frame) -> bool:
        self.asked += 1
        return True


def frames(first_id: int, count: int, job_id: str = "a", kind: str | None = "k") -> list[Frame]:
    return [
        Frame(job_id, n + 1, first_id + n, "log", "t", b'{"n":%d}' % n, kind) for n in range(count)
    ]


PARKED: set[asyncio.Task[bool]] = set()


async def park(
    channel: FeedChannel, feed_filter: FeedFilter, pushed: list[list[Frame]]
) -> FeedLive:
    """A subscriber parked at the end of the log whose pushes land in ``pushed``."""

    def push(batch: list[Frame]) -> bool:
        pushed.append(batch)
        return True

    group = channel.join(feed_filter)
    live = FeedLive(channel.high_water, push)
    task = asyncio.get_running_loop().create_task(channel.wait_pushed(group, live, WAIT))
    PARKED.add(task)
    task.add_done_callback(PARKED.discard)
    await asyncio.sleep(0)  # one loop step: the task runs up to its await, parked
    assert live.woken is not None
    return live


async def unpark() -> None:
    tasks = list(PARKED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_filter_is_evaluated_once_per_event_for_its_whole_group() -> None:
    """Five subscribers with one filter: each published event is tested once, and each
    subscriber is pushed the same matches."""
    channel = FeedChannel(100, 1 << 20)
    channel.start(0)
    grant = CountingGrant()
    feed_filter = FeedFilter(kinds=frozenset({"k"}), grant=grant)
    pushed: list[list[list[Frame]]] = [[] for _ in range(5)]
    lives = [await park(channel, feed_filter, out) for out in pushed]
    assert channel.groups == 1
    channel.publish(frames(1, 10))
    assert grant.asked == 10
    for live, out in zip(lives, pushed, strict=True):
        assert [frame.event_id for batch in out for frame in batch] == list(range(1, 11))
        assert live.after == 10
    await unpark()


async def test_parked_positions_move_over_ids_that_do_not_match() -> None:
    """A subscriber whose filter matches nothing in a publication is not woken and not
    pushed; its position moves to the end of what was published (its next heartbeat)."""
    channel = FeedChannel(100, 1 << 20)
    channel.start(0)
    pushed: list[list[Frame]] = []
    live = await park(channel, FeedFilter(jobs=frozenset({"other"})), pushed)
    channel.publish(frames(1, 3, job_id="a"))
    assert pushed == []
    assert live.after == 3
    assert live.woken is not None
    assert not live.woken.done()
    await unpark()


async def test_the_cache_answers_only_for_the_range_it_holds() -> None:
    """frames_after is None below the oldest cached id, and a page ends at the scanned
    position: the last match when full, else the high water."""
    channel = FeedChannel(4, 1 << 20)
    channel.start(0)
    channel.publish(frames(1, 6))  # keeps ids 3..6
    assert channel.frames_after(1, 10, FeedFilter()) is None
    page = channel.frames_after(2, 2, FeedFilter())
    assert page is not None
    assert [frame.event_id for frame in page[0]] == [3, 4]
    assert page[1] == 4
    rest = channel.frames_after(4, 10, FeedFilter(jobs=frozenset({"nope"})))
    assert rest == ([], 6)


class NotJob:
    """A grant that refuses one job's events: what auth.md's tenant and job grants become."""

    everything = False

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.key = f"not:{refused}"

    def permits(self, frame: Frame) -> bool:
        return frame.job_id != self.refused


async def test_the_grant_is_asked_about_every_event_replayed_or_live(
    make_config: ConfigFactory, tmp_path: Path
) -> None:
    """One grant, one place: a refused job's events are left out of the SQLite replay (no
    feed cache) and of the live pushes alike; the rest arrive in id order."""
    config = make_config(stream__feed_cache_events=0)
    hub = Hub(10, 1 << 20, 0, 0)
    store = Store(config, hub)
    await store.open()
    try:
        for job_id in ("a", "b"):
            await store.writer.create_job(JobKey("default", job_id), None, None)
        for n in range(3):
            for job_id in ("a", "b"):
                await store.writer.append(
                    JobKey("default", job_id), [LogIn(type="log", message=f"{n}")]
                )
        replayed_to = hub.feed.high_water
        cursor = FeedCursor(0)
        pushed: list[list[Frame]] = []

        def push(batch: list[Frame]) -> bool:
            pushed.append(batch)
            return True

        batches = follow_feed(
            store,
            hub.feed,
            cursor,
            FeedFilter(grant=NotJob("b")),
            page_events=2,
            page_bytes=1 << 20,
            scan_ids=3,
            idle_seconds=0.2,
            push=push,
        )
        received: list[Frame] = []
        async with asyncio.timeout(WAIT):
            while cursor.after < replayed_to:
                batch = await anext(batches)
                received.extend(batch or [])
            replayed = list(received)
            # At the end of the log: the next step parks (synchronously, up to its await).
            parked = asyncio.ensure_future(anext(batches))
            await asyncio.sleep(0)
            assert any(group.live for group in hub.feed._groups.values())
            for job_id in ("b", "a"):
                await store.writer.append(
                    JobKey("default", job_id), [LogIn(type="log", message="live")]
                )
            assert await parked is None  # pushed, then idle: a heartbeat
            assert cursor.after == hub.feed.high_water
        await batches.aclose()
    finally:
        await store.close()
    assert [(f.job_id, f.seq) for f in replayed] == [("a", 1), ("a", 2), ("a", 3), ("a", 4)]
    assert [(f.job_id, f.seq) for batch in pushed for f in batch] == [("a", 5)]


class Raising:
    """A grant with a bug."""

    key = "raising"
    everything = False

    def permits(self, frame: Frame) -> bool:
        raise RuntimeError("a bug in a grant")


async def test_a_failing_filter_never_reaches_the_publisher() -> None:
    """An exception while a group's filter runs is logged; the publish goes on for the other
    groups, and that group's subscribers are woken to read for themselves."""
    channel = FeedChannel(100, 1 << 20)
    channel.start(0)
    broken: list[list[Frame]] = []
    fine: list[list[Frame]] = []
    woken = await park(channel, FeedFilter(grant=Raising()), broken)
    await park(channel, FeedFilter(), fine)
    channel.publish(frames(1, 2))  # does not raise
    assert [frame.event_id for batch in fine for frame in batch] == [1, 2]
    assert broken == []
    assert woken.after == 0
    await unpark()
