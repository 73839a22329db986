"""server.hub: high-water marks, wake-ups and the bounded frame cache, without I/O."""

from __future__ import annotations

import asyncio

import pytest

from server.frames import WRITE_PART_BYTES, Frame
from server.hub import Hub, JobChannel, LiveSubscriber
from server.tenancy import JobKey


def key(job_id: str) -> JobKey:
    """The job ``job_id`` of the tenant every test here writes to."""
    return JobKey("default", job_id)


def frame(seq: int, job_id: str = "job", size: int = 100, event_type: str = "log") -> Frame:
    """A committed frame whose JSON is exactly ``size`` bytes."""
    head = b'{"seq":%d,"pad":"' % seq
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(body) == size
    return Frame(job_id, seq, seq, event_type, "2026-01-01T00:00:00.000000Z", body)


def frames(first: int, last: int, job_id: str = "job", size: int = 100) -> list[Frame]:
    return [frame(seq, job_id, size) for seq in range(first, last + 1)]


def seqs(cached: list[Frame] | None) -> list[int] | None:
    return None if cached is None else [f.seq for f in cached]


def big_hub(cache_events_per_job: int = 1024) -> Hub:
    return Hub(cache_events_per_job, cache_bytes=1 << 30)


# -- frames_after ---------------------------------------------------------------------------


def test_frames_after_the_end_is_empty() -> None:
    """At the end of what is committed, the cache answers [] (nothing yet), not None."""
    hub = big_hub()
    hub.publish(key("job"), frames(1, 3))
    channel = hub.attach(key("job"), 3)
    assert channel.frames_after(3, 10) == []


def test_frames_after_the_end_is_empty_with_nothing_cached() -> None:
    """A channel with an empty cache still knows it is at the end (its high water)."""
    channel = big_hub(cache_events_per_job=0).attach(key("job"), 7)
    assert channel.frames_after(7, 10) == []


def test_frames_after_is_none_when_the_cache_does_not_reach_back() -> None:
    """Asking for seqs older than the cache holds sends the caller to SQLite (None)."""
    hub = big_hub(cache_events_per_job=4)
    hub.publish(key("job"), frames(1, 10))
    channel = hub.attach(key("job"), 10)
    assert seqs(channel.frames) == [7, 8, 9, 10]
    assert channel.frames_after(0, 100) is None
    assert channel.frames_after(5, 100) is None


def test_frames_after_is_none_when_committed_seqs_are_not_cached() -> None:
    """With caching off, anything below the high water must come from SQLite."""
    hub = big_hub(cache_events_per_job=0)
    hub.publish(key("job"), frames(1, 5))
    channel = hub.attach(key("job"), 5)
    assert channel.frames_after(4, 100) is None


def test_frames_after_slices_the_cache() -> None:
    """When the cache reaches back to after + 1, it answers a contiguous slice of <= limit."""
    hub = big_hub(cache_events_per_job=4)
    hub.publish(key("job"), frames(1, 10))
    channel = hub.attach(key("job"), 10)
    assert seqs(channel.frames_after(6, 100)) == [7, 8, 9, 10]
    assert seqs(channel.frames_after(7, 2)) == [8, 9]
    assert seqs(channel.frames_after(9, 100)) == [10]


def test_frames_after_past_the_cache_when_the_high_water_is_ahead() -> None:
    """A high water raised by attach (a last_seq read from SQLite before the publish
    arrived) sends the caller past the cache to SQLite, never to an empty answer."""
    hub = big_hub()
    hub.publish(key("job"), frames(1, 3))
    channel = hub.attach(key("job"), 5)
    assert channel.high_water == 5
    assert channel.frames_after(3, 10) is None


# -- wake-ups -------------------------------------------------------------------------------


async def test_publish_wakes_a_waiter() -> None:
    """A subscriber waiting at its end is woken by the next publish for its job."""
    hub = big_hub()
    channel = hub.attach(key("job"), 3)
    # Runs once wait_beyond is parked on the channel (the loop's next turn).
    asyncio.get_running_loop().call_soon(hub.publish, key("job"), frames(4, 4))
    async with asyncio.timeout(5):
        assert await channel.wait_beyond(3, timeout=60) is True
    assert channel.high_water == 4


async def test_publish_for_another_job_does_not_wake() -> None:
    """Only the job's own publishes wake its waiters."""
    hub = big_hub()
    channel = hub.attach(key("job"), 3)
    asyncio.get_running_loop().call_soon(hub.publish, key("other"), frames(1, 1, job_id="other"))
    assert await channel.wait_beyond(3, timeout=0.05) is False


async def test_wait_beyond_returns_at_once_when_already_beyond() -> None:
    """No wait when something past ``after`` is already committed."""
    channel = big_hub().attach(key("job"), 5)
    async with asyncio.timeout(5):
        assert await channel.wait_beyond(4, timeout=60) is True


async def test_wait_beyond_times_out_with_false() -> None:
    """With nothing published, wait_beyond gives up after its timeout and says so."""
    channel = big_hub().attach(key("job"), 5)
    assert await channel.wait_beyond(5, timeout=0.01) is False


async def test_close_wakes_waiters() -> None:
    """Shutdown wakes every waiting subscriber, which then sees ``closing``."""
    hub = big_hub()
    channel = hub.attach(key("job"), 1)
    asyncio.get_running_loop().call_soon(hub.close)
    async with asyncio.timeout(5):
        assert await channel.wait_beyond(1, timeout=60) is True
    assert hub.closing


# -- pushes to parked subscribers ---------------------------------------------------------------


class Socket(LiveSubscriber):
    """A parked subscriber: records the seqs pushed to it and how often it was woken or
    idle; ``accepts`` False is a backed-up socket, ``heartbeats`` False one that cannot
    write its heartbeat at once. ``called`` is set at each wake-up or idle call."""

    __slots__ = ("accepts", "called", "heartbeats", "idled", "seqs", "woken")

    def __init__(self, after: int, accepts: bool = True, heartbeats: bool = True) -> None:
        super().__init__(after)
        self.accepts = accepts
        self.heartbeats = heartbeats
        self.seqs: list[int] = []
        self.woken = 0
        self.idled = 0
        self.called = asyncio.Event()

    def push(self, frames: list[Frame]) -> bool:
        if self.accepts:
            self.seqs.extend(f.seq for f in frames)
        return self.accepts

    def wake(self) -> None:
        self.woken += 1
        self.called.set()

    def idle(self) -> bool:
        self.idled += 1
        self.called.set()
        return self.heartbeats


def park(channel: JobChannel, live: LiveSubscriber, idle_seconds: float = 60) -> None:
    assert channel.park(live, idle_seconds)
    assert live.parked
    assert live in channel.live


async def test_publish_pushes_to_a_parked_subscriber_without_waking_it() -> None:
    """A caught-up subscriber gets each publish in the publisher's own step, in order, and
    stays parked: no wake-up per event, no task of its own."""
    hub = big_hub()
    channel = hub.attach(key("job"), 3)
    live = Socket(3)
    park(channel, live)
    hub.publish(key("job"), frames(4, 5))
    hub.publish(key("job"), frames(6, 6))
    assert live.seqs == [4, 5, 6]
    assert (live.after, live.sent, live.woken, live.parked) == (6, 3, 0, True)
    assert hub.frames_sent.push == 3
    channel.unpark(live)
    assert live not in channel.live  # unparked, it leaves nothing behind
    assert not live.parked
    hub.publish(key("job"), frames(7, 7))
    assert live.seqs == [4, 5, 6]


@pytest.mark.parametrize(
    ("live", "published", "why"),
    [
        (Socket(3, accepts=False), frames(4, 4), "backed-up socket"),
        (Socket(3), [frame(4, event_type="completed")], "terminal event"),
        (Socket(3), frames(5, 6), "not contiguous with its position"),
        (Socket(3), frames(4, 5, size=WRITE_PART_BYTES // 2 + 1), "more than one write part"),
    ],
    ids=["backed-up", "terminal", "gap", "large"],
)
async def test_a_subscriber_that_cannot_take_a_push_is_woken(
    live: Socket, published: list[Frame], why: str
) -> None:
    """Anything the publisher cannot hand over at once wakes the subscriber to read for
    itself (from the cache or SQLite), unparked, with its position unmoved."""
    hub = big_hub()
    channel = hub.attach(key("job"), 3)
    park(channel, live)
    hub.publish(key("job"), published)
    assert live.woken == 1, why
    assert live.seqs == []
    assert live.after == 3
    assert not live.parked
    assert not channel.live


async def test_a_push_that_raises_wakes_the_subscriber() -> None:
    """A push that fails (a bug, a dying transport) never reaches the publisher."""

    class Broken(Socket):
        __slots__ = ()

        def push(self, frames: list[Frame]) -> bool:
            raise ConnectionResetError("gone")

    hub = big_hub()
    channel = hub.attach(key("job"), 3)
    live = Broken(3)
    park(channel, live)
    hub.publish(key("job"), frames(4, 4))
    assert (live.woken, live.after, live.parked) == (1, 3, False)


async def test_close_wakes_parked_subscribers() -> None:
    hub = big_hub()
    channel = hub.attach(key("job"), 1)
    live = Socket(1)
    park(channel, live)
    hub.close()
    assert (live.woken, live.parked) == (1, False)
    assert hub.closing


async def test_park_refuses_a_subscriber_behind_the_high_water_mark() -> None:
    """Frames committed while a subscriber read are not pushed: it reads them first."""
    channel = big_hub().attach(key("job"), 5)
    live = Socket(4)
    assert channel.park(live, 60) is False
    assert not channel.live
    assert not live.parked


@pytest.mark.parametrize("heartbeats", [True, False], ids=["writes-it", "reads"])
async def test_an_idle_parked_subscriber_is_called_for_a_heartbeat(heartbeats: bool) -> None:
    """After idle_seconds with nothing pushed, a parked subscriber is called back for a
    heartbeat: one that writes it at once stays parked (and is called again after another
    idle_seconds); one that cannot is unparked, to send it from its own task."""
    hub = big_hub()
    channel = hub.attach(key("job"), 1)
    live = Socket(1, heartbeats=heartbeats)
    park(channel, live, idle_seconds=0.01)
    async with asyncio.timeout(5):
        await live.called.wait()
    assert (live.idled, live.woken) == (1, 0)
    assert live.parked is heartbeats
    assert (live in channel.live) is heartbeats
    if heartbeats:
        live.called.clear()
        async with asyncio.timeout(5):
            await live.called.wait()
        assert live.idled == 2
        channel.unpark(live)


# -- memory bounds --------------------------------------------------------------------------


def test_per_job_cap_keeps_the_newest_frames() -> None:
    """At most cache_events_per_job frames per job; the oldest go first."""
    hub = big_hub(cache_events_per_job=3)
    hub.publish(key("job"), frames(1, 2))
    hub.publish(key("job"), frames(3, 5))
    channel = hub.attach(key("job"), 5)
    assert seqs(channel.frames) == [3, 4, 5]
    assert channel.first_seq == 3
    assert channel.cached_bytes == 300


def test_cache_bytes_are_accounted_exactly() -> None:
    """total_bytes goes up and down with what is cached (plus a fixed per-channel cost)."""
    hub = big_hub(cache_events_per_job=2)
    hub.publish(key("job"), frames(1, 1))
    overhead = hub.total_bytes - 100
    assert overhead >= 0
    hub.publish(key("job"), frames(2, 5))
    assert hub.total_bytes == overhead + 200


def _hub_with_budget_for(jobs: int, frames_per_job: int) -> tuple[Hub, int]:
    """A hub whose byte budget holds exactly ``jobs`` jobs of ``frames_per_job`` frames of
    100 bytes (the per-channel overhead is measured, not assumed)."""
    probe = big_hub()
    probe.publish(key("probe"), frames(1, 1, job_id="probe"))
    overhead = probe.total_bytes - 100
    budget = jobs * (overhead + 100 * frames_per_job)
    return Hub(1024, cache_bytes=budget), overhead


def test_byte_budget_evicts_the_least_recently_published_job() -> None:
    """Over the global budget, the job published longest ago loses its cache first."""
    hub, _ = _hub_with_budget_for(jobs=2, frames_per_job=3)
    hub.publish(key("a"), frames(1, 3, job_id="a"))
    hub.publish(key("b"), frames(1, 3, job_id="b"))
    hub.publish(key("a"), frames(4, 4, job_id="a"))  # a is now the most recent...
    hub.publish(key("c"), frames(1, 2, job_id="c"))  # ...so b pays for c
    assert hub.total_bytes <= hub.cache_bytes
    a, b, c = hub.attach(key("a"), 4), hub.attach(key("b"), 3), hub.attach(key("c"), 2)
    assert seqs(b.frames) == []
    assert seqs(a.frames) == [1, 2, 3, 4]
    assert seqs(c.frames) == [1, 2]
    # b's history is still committed: the cache sends its readers to SQLite.
    assert b.frames_after(0, 10) is None
    assert b.frames_after(3, 10) == []


def test_byte_budget_trims_the_newest_job_from_its_oldest_frames() -> None:
    """A single job over budget keeps a contiguous suffix of its newest frames."""
    hub, overhead = _hub_with_budget_for(jobs=1, frames_per_job=4)
    hub.publish(key("job"), frames(1, 10))
    channel = hub.attach(key("job"), 10)
    cached = seqs(channel.frames)
    assert cached, "the newest frames should stay cached"
    assert cached == list(range(cached[0], 11))
    assert channel.first_seq == cached[0]
    assert hub.total_bytes == overhead + 100 * len(cached) <= hub.cache_bytes
    assert channel.frames_after(cached[0] - 2, 10) is None


def test_byte_budget_keeps_subscribed_channels() -> None:
    """Eviction empties a subscribed job's cache but keeps its channel and high water."""
    hub, _ = _hub_with_budget_for(jobs=1, frames_per_job=3)
    watched = hub.attach(key("a"), 0)
    hub.publish(key("a"), frames(1, 3, job_id="a"))
    hub.publish(key("b"), frames(1, 3, job_id="b"))
    assert watched.frames == []
    assert hub.attach(key("a"), 0) is watched
    assert watched.high_water == 3


# -- channel life -------------------------------------------------------------------------


def test_detach_drops_an_empty_unsubscribed_channel() -> None:
    """The last subscriber leaving a channel with nothing cached frees it."""
    hub = big_hub(cache_events_per_job=0)
    channel = hub.attach(key("job"), 5)
    assert hub.total_bytes > 0
    hub.detach(channel)
    assert hub.total_bytes == 0
    fresh = hub.attach(key("job"), 2)
    assert fresh is not channel
    assert fresh.high_water == 2


def test_detach_keeps_a_channel_while_others_subscribe() -> None:
    """A channel stays while any subscriber holds it."""
    hub = big_hub(cache_events_per_job=0)
    first = hub.attach(key("job"), 5)
    second = hub.attach(key("job"), 5)
    assert second is first
    hub.detach(first)
    assert first.subscribers == 1
    assert hub.attach(key("job"), 0) is first


def test_detach_keeps_a_channel_with_cached_frames() -> None:
    """Cached frames outlive their subscribers (a reconnect reads them)."""
    hub = big_hub()
    hub.publish(key("job"), frames(1, 3))
    channel = hub.attach(key("job"), 3)
    hub.detach(channel)
    again = hub.attach(key("job"), 0)
    assert again is channel
    assert seqs(again.frames_after(0, 10)) == [1, 2, 3]


def test_non_contiguous_publish_resets_the_cache() -> None:
    """Frames that do not follow the cached ones replace them; no gap is ever served."""
    hub = big_hub()
    hub.publish(key("job"), frames(1, 3))
    hub.publish(key("job"), frames(7, 8))
    channel: JobChannel = hub.attach(key("job"), 8)
    assert seqs(channel.frames) == [7, 8]
    assert channel.first_seq == 7
    assert channel.cached_bytes == 200
    assert channel.frames_after(3, 10) is None
    assert seqs(channel.frames_after(6, 10)) == [7, 8]


def test_publish_raises_the_high_water() -> None:
    """The high water is the last published seq (and never goes back)."""
    hub = big_hub()
    channel = hub.attach(key("job"), 0)
    hub.publish(key("job"), frames(1, 4))
    assert channel.high_water == 4
    assert hub.attach(key("job"), 2).high_water == 4


# -- deleted jobs ---------------------------------------------------------------------------


async def test_forget_jobs_drops_frames_and_ends_subscribers() -> None:
    """A deleted job's cached frames leave the job's and the feed's caches (the other job's
    stay), its channel is marked deleted and its waiters wake; a publish for the same id
    afterwards starts a new channel."""
    hub = big_hub()
    channel = hub.attach(key("gone"), 0)
    hub.publish(key("gone"), frames(1, 3, "gone"))
    hub.publish_feed(frames(1, 3, "gone"))
    hub.publish(key("kept"), frames(1, 2, "kept"))
    hub.publish_feed(frames(4, 5, "kept"))
    waiter = asyncio.create_task(channel.wait_beyond(3, timeout=10))
    await asyncio.sleep(0)
    hub.forget_jobs([key("gone")])
    assert await asyncio.wait_for(waiter, 5) is True
    assert channel.deleted
    assert channel.frames == []
    assert [f.job_id for f in hub.feed.frames] == ["kept", "kept"]
    hub.publish(key("gone"), frames(1, 1, "gone"))
    fresh = hub.attach(key("gone"), 1)
    assert fresh is not channel
    assert not fresh.deleted


def test_deleted_since_remembers_recent_deletions_and_says_when_it_cannot_know() -> None:
    """True for a job deleted after the mark, False for one that was not, and None once
    more deletions than it remembers happened after the mark (the caller reads the log)."""
    hub = big_hub()
    mark = hub.deletions
    hub.forget_jobs([key("a")])
    assert hub.deleted_since(key("a"), mark) is True
    assert hub.deleted_since(key("a"), hub.deletions) is False
    assert hub.deleted_since(key("b"), mark) is False
    hub.forget_jobs([key(f"many-{n}") for n in range(5000)])
    assert hub.deleted_since(key("b"), mark) is None
    assert hub.deleted_since(key("many-4999"), mark) is True
