"""The feed: the events of many jobs on one cursor, the server-wide event ``id`` (feed.md).

"The log is the buffer", as for a job stream (``server.follow``): a feed subscriber is only a
position in the global log — every matching event with ``id <= after`` has been sent — and
each step sends what lies past it, from the hub's recent frames across all jobs when they
reach back far enough, else from SQLite, then waits at the end of the log. Nothing is queued
for a subscriber anywhere, so a slow one only lags, and the position only moves over ids
actually scanned, in order: no hole and no duplicate however replay and appends interleave.

The position is what was *scanned*, not the last event sent: a sparse filter moves over many
ids that it does not match, and its heartbeats carry that position so that a client resumes
past them instead of scanning them again.

Live, subscribers parked at the end of the log are grouped by their filter's canonical key
(``FeedFilter.key``): the publisher evaluates a filter once per event for the whole group,
hands the matches to each parked WebSocket directly (a push, as ``server.hub`` does for job
streams), wakes an SSE subscriber only when something matched, and moves every other parked
position past the ids that did not match.

Authorization lives in one place: ``FeedFilter.grant`` (a ``Grant``) is asked about every
event the feed is about to send, replayed or live (``FeedFilter.matches`` and
``FeedFilter.permitted``). With authentication on it is the credential's ``TenantGrant``
(``server.auth``: its tenant, its job grants); off, ``ALL_EVENTS`` (everything is tenant
``default``).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from .frames import Frame, within_bytes
from .metrics import FramesSent

if TYPE_CHECKING:
    from .store import Store

log = structlog.get_logger("jobfeed.feed")

# Sends frames to a subscriber now, without blocking; False if it cannot (it then reads them).
FeedPushFn = Callable[[list[Frame]], bool]


class FeedClosing(Exception):
    """The server is shutting down; the subscriber should resume elsewhere (1001)."""


class Grant(Protocol):
    """What a credential may read, asked about every event before the feed sends it.

    ``key`` names the grant: subscribers share a filter group (and its once-per-event
    evaluation) only when their filters and their grants' keys are equal. ``everything`` lets
    the replay skip the per-event call when the grant cannot refuse anything.
    """

    @property
    def key(self) -> str: ...

    @property
    def everything(self) -> bool: ...

    def permits(self, frame: Frame) -> bool: ...


class AllEvents:
    """Every event of every job: the grant with authentication off (one tenant)."""

    key = "*"
    everything = True

    def permits(self, frame: Frame) -> bool:
        return True


ALL_EVENTS: Grant = AllEvents()


@dataclass(frozen=True, slots=True)
class FeedFilter:
    """A feed's filters (AND between kinds of filter, OR between values of one), and the
    subscriber's grant. Every field is something an event never changes once written: its
    job's id, that job's kind, its own type. So a replay and a live view of one range agree.
    """

    jobs: frozenset[str] = frozenset()
    prefix: str | None = None
    kinds: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    grant: Grant = field(default=ALL_EVENTS, compare=False)

    @property
    def key(self) -> tuple[object, ...]:
        """Canonical: equal for filters that select the same events for the same grant."""
        return (
            tuple(sorted(self.jobs)),
            self.prefix,
            tuple(sorted(self.kinds)),
            tuple(sorted(self.types)),
            self.grant.key,
        )

    @property
    def selects_jobs(self) -> bool:
        return bool(self.jobs or self.prefix is not None or self.kinds)

    def describe(self) -> dict[str, object]:
        """For log lines: only the filters that are set."""
        described: dict[str, object] = {}
        if self.jobs:
            described["job"] = sorted(self.jobs)
        if self.prefix is not None:
            described["prefix"] = self.prefix
        if self.kinds:
            described["kind"] = sorted(self.kinds)
        if self.types:
            described["type"] = sorted(self.types)
        if not self.grant.everything:
            described["grant"] = self.grant.key
        return described

    def matches(self, frame: Frame) -> bool:
        """The live path's test (the cache's frames carry their job's kind)."""
        if self.jobs and frame.job_id not in self.jobs:
            return False
        if self.prefix is not None and not frame.job_id.startswith(self.prefix):
            return False
        if self.kinds and frame.kind not in self.kinds:
            return False
        if self.types and frame.event_type not in self.types:
            return False
        return self.grant.everything or self.grant.permits(frame)

    def permitted(self, frames: list[Frame]) -> list[Frame]:
        """The replay's grant check: SQL has applied the other filters already."""
        if self.grant.everything:
            return frames
        return [frame for frame in frames if self.grant.permits(frame)]


class FeedLive:
    """A subscriber parked at the end of the log: ``after`` is its scanned position,
    advanced by the publisher; ``woken`` resolves when it must read for itself."""

    __slots__ = ("after", "last_push", "push", "pushed", "woken")

    def __init__(self, after: int, push: FeedPushFn | None) -> None:
        self.after = after
        self.push = push
        self.pushed = 0
        self.last_push: float | None = None
        self.woken: asyncio.Future[bool] | None = None

    def wake(self) -> None:
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(True)


class FilterGroup:
    """The parked subscribers that share one filter: it is evaluated once per event for all."""

    __slots__ = ("feed_filter", "live", "members")

    def __init__(self, feed_filter: FeedFilter) -> None:
        self.feed_filter = feed_filter
        self.live: dict[int, FeedLive] = {}
        self.members = 0

    def deliver(self, frames: list[Frame], before: int, high: int, now: float) -> None:
        """``frames`` (ids ``before < id <= high``) were committed: push the matches to each
        parked subscriber that had scanned up to ``before``; move the position of those that
        nothing matched; wake the others."""
        matched: list[Frame] | None = None
        stalled = []
        for key, live in self.live.items():
            if live.after >= high:
                continue
            if live.after != before:
                stalled.append(key)  # it must read what lies between for itself
                continue
            if matched is None:
                matches = self.feed_filter.matches
                matched = [frame for frame in frames if matches(frame)]
            if not matched:
                live.after = high
            elif live.push is not None and _pushed(live.push, matched):
                live.after = high
                live.pushed += len(matched)
                live.last_push = now
            else:
                stalled.append(key)
        for key in stalled:
            self.live.pop(key).wake()

    def wake_all(self) -> None:
        for live in self.live.values():
            live.wake()
        self.live.clear()


def _pushed(push: FeedPushFn, frames: list[Frame]) -> bool:
    try:
        return push(frames)
    except Exception:
        return False  # its own task will meet the error and end the stream properly


class FeedChannel:
    """The global log's live state: its high-water id, recent frames across all jobs, and
    the filter groups of parked subscribers.

    The writer publishes each committed group's frames here in id order, after COMMIT and
    after the per-job channels (``Hub.publish_feed``). The cache holds every event with
    ``covers_after < id <= high_water``, at most ``cache_events`` frames and ``cache_bytes``
    bytes of them (the oldest go first).
    """

    def __init__(self, cache_events: int, cache_bytes: int) -> None:
        self.cache_events = cache_events
        self.cache_bytes = cache_bytes
        self.high_water = 0
        self.covers_after = 0
        self.frames: list[Frame] = []
        self.cached_bytes = 0
        self.frames_sent = FramesSent()  # feed streams' (GET /metrics)
        self.closing = False
        self.subscribers = 0
        self._groups: dict[tuple[object, ...], FilterGroup] = {}
        self._changed = asyncio.Event()
        self._waiting = 0  # tasks in wait_beyond

    def start(self, last_id: int) -> None:
        """The log's end when the writer starts: nothing before it is cached."""
        self.high_water = self.covers_after = last_id
        self._evict(len(self.frames))

    @property
    def groups(self) -> int:
        return len(self._groups)

    def join(self, feed_filter: FeedFilter) -> FilterGroup:
        group = self._groups.get(feed_filter.key)
        if group is None:
            group = self._groups[feed_filter.key] = FilterGroup(feed_filter)
        group.members += 1
        self.subscribers += 1
        return group

    def leave(self, group: FilterGroup) -> None:
        group.members -= 1
        self.subscribers -= 1
        if group.members == 0:
            self._groups.pop(group.feed_filter.key, None)

    def frames_after(
        self, after: int, limit: int, feed_filter: FeedFilter
    ) -> tuple[list[Frame], int] | None:
        """Up to ``limit`` matching frames with ``id > after`` from the cache, and the
        position scanned; None if the cache does not reach back to ``after``."""
        if after < self.covers_after:
            return None
        frames = self.frames
        start = bisect_right(frames, after, key=_event_id)
        matches = feed_filter.matches
        found: list[Frame] = []
        for index in range(start, len(frames)):
            frame = frames[index]
            if matches(frame):
                found.append(frame)
                if len(found) >= limit:
                    return found, frame.event_id
        return found, self.high_water

    def forget_jobs(self, keys: set[tuple[str, str]]) -> None:
        """Deleted jobs' frames leave the cache (``Hub.forget_jobs``), in one pass: feed
        replays from memory stop showing them, as replays from SQLite do. The cache still
        covers the same ids: what it no longer holds is no longer in the log either."""
        if not self.frames or not keys:
            return
        kept = [f for f in self.frames if (f.tenant, f.job_id) not in keys]
        if len(kept) != len(self.frames):
            self.frames = kept
            self.cached_bytes = sum(frame.size for frame in kept)

    def publish(self, frames: list[Frame]) -> None:
        """Called by the writer after commit with one group's frames, in id order."""
        if not frames:
            return
        before = self.high_water
        high = self.high_water = frames[-1].event_id
        self._cache(frames)
        if self._groups:
            now = asyncio.get_running_loop().time()
            for group in self._groups.values():
                if group.live:
                    try:
                        group.deliver(frames, before, high, now)
                    except Exception:
                        # A bug (or a grant that raises) must not reach the writer, which
                        # has committed already: the group's subscribers read for themselves
                        # and meet the error in their own tasks.
                        log.exception("feed_deliver_failed", feed=group.feed_filter.describe())
                        group.wake_all()
        self._wake()

    async def wait_beyond(self, after: int, timeout: float) -> bool:
        """Wait until something past ``after`` is committed; False on timeout."""
        if self.high_water > after:
            return True
        changed = self._changed
        self._waiting += 1
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1
        return True

    async def wait_pushed(self, group: FilterGroup, live: FeedLive, timeout: float) -> bool:
        """Park ``live`` in its group; True when it must read for itself, False after
        ``timeout``. Meanwhile the publisher pushes matches or moves its position."""
        if self.high_water > live.after:
            return True
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[bool] = loop.create_future()
        live.woken = woken
        group.live[id(live)] = live
        expiry = loop.call_later(timeout, _expire, woken)
        try:
            return await woken
        finally:
            expiry.cancel()
            group.live.pop(id(live), None)
            live.woken = None

    def close(self) -> None:
        """Shutdown: every waiting subscriber wakes up and sees ``closing``."""
        self.closing = True
        for group in self._groups.values():
            group.wake_all()
        self._wake()

    def _wake(self) -> None:
        # Waiters hold the old Event; a fresh one makes the next wait block again. Only when
        # someone waits: this runs on every commit, and most feeds park in a group instead.
        if self._waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    def _cache(self, frames: list[Frame]) -> None:
        if self.cache_events == 0 or self.cache_bytes == 0:
            self.covers_after = self.high_water
            return
        self.frames.extend(frames)
        self.cached_bytes += sum(frame.size for frame in frames)
        overflow = len(self.frames) - self.cache_events
        if overflow > 0:
            # Trimmed in bulk, down to 7/8 of the cap: deleting from the front of a list
            # moves every pointer behind it, once per publish would be on every commit.
            self._evict(overflow + self.cache_events // 8)
        while self.cached_bytes > self.cache_bytes and self.frames:
            self._evict(max(1, len(self.frames) // 4))

    def _evict(self, count: int) -> None:
        if count <= 0:
            return
        dropped = self.frames[:count]
        del self.frames[:count]
        self.cached_bytes -= sum(frame.size for frame in dropped)
        self.covers_after = max(self.covers_after, dropped[-1].event_id)


def _event_id(frame: Frame) -> int:
    return frame.event_id


def _expire(woken: asyncio.Future[bool]) -> None:
    if not woken.done():
        woken.set_result(False)


@dataclass(slots=True)
class FeedCursor:
    """Where a feed subscriber is: every matching event with ``id <= after`` was sent."""

    after: int
    sent: int = 0
    # Parked at the end of the log, where the publisher moves it (``after`` is then the
    # live subscriber's, not this one's): nothing committed is waiting for it.
    parked: bool = False


async def follow_feed(
    store: Store,
    feed: FeedChannel,
    cursor: FeedCursor,
    feed_filter: FeedFilter,
    *,
    page_events: int,
    page_bytes: int,
    scan_ids: int,
    idle_seconds: float,
    push: FeedPushFn | None = None,
) -> AsyncGenerator[list[Frame] | None, None]:
    """Yield batches of matching frames past ``cursor.after``, in id order, forever; ``None``
    after ``idle_seconds`` without sending any (a heartbeat carries ``cursor.after``).

    A replay from SQLite scans at most ``scan_ids`` ids per step (``Store.read_feed``), so a
    sparse filter over a long log still yields control, and heartbeats, as it goes; a step
    holds at most ``page_bytes`` of events (plus one), as a job stream's does.
    With ``push``, a cursor at the end of the log is handed matches by the publisher.
    """
    group = feed.join(feed_filter)
    loop = asyncio.get_running_loop()
    sent = feed.frames_sent
    last_sent = loop.time()
    try:
        while True:
            if feed.closing:
                raise FeedClosing()
            high = feed.high_water
            if cursor.after < high:
                cached = feed.frames_after(cursor.after, page_events, feed_filter)
                if cached is None:
                    upper = min(high, cursor.after + scan_ids)
                    frames, scanned = await store.read_feed(
                        cursor.after, upper, feed_filter, page_events, page_bytes
                    )
                    frames = feed_filter.permitted(frames)
                    sent.database += len(frames)
                else:
                    frames, scanned = cached
                    within = within_bytes(frames, page_bytes)
                    if len(within) < len(frames):
                        frames, scanned = within, within[-1].event_id
                    sent.cache += len(frames)
                cursor.after = scanned
                if frames:
                    cursor.sent += len(frames)
                    last_sent = loop.time()
                    yield frames
                elif loop.time() - last_sent >= idle_seconds:
                    last_sent = loop.time()
                    yield None
                continue
            if feed.closing:  # checked again: close() may have run during a read above
                raise FeedClosing()
            wait = max(0.0, last_sent + idle_seconds - loop.time())
            if cursor.after == high:
                before = cursor.sent
                readable, last_push = await _park(feed, group, cursor, push, wait, idle_seconds)
                sent.push += cursor.sent - before
                if last_push is not None:
                    last_sent = max(last_sent, last_push)
            else:
                # Ahead of the hub (a position read from SQLite a moment before the
                # publisher ran): nothing to park on until the hub catches up.
                readable = await feed.wait_beyond(cursor.after, wait)
            if not readable and not feed.closing:
                last_sent = loop.time()
                yield None
    finally:
        feed.leave(group)


async def _park(
    feed: FeedChannel,
    group: FilterGroup,
    cursor: FeedCursor,
    push: FeedPushFn | None,
    first_wait: float,
    idle_seconds: float,
) -> tuple[bool, float | None]:
    """Park at the end of the log; True when there is something to read, False when
    ``first_wait`` (then ``idle_seconds`` after each push) passes with nothing sent; and
    the loop time of the last push, if any."""
    live = FeedLive(cursor.after, push)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + first_wait
    cursor.parked = True
    try:
        while True:
            if await feed.wait_pushed(group, live, max(0.0, deadline - loop.time())):
                return True, live.last_push
            if live.last_push is None or live.last_push + idle_seconds <= loop.time():
                return False, live.last_push
            deadline = live.last_push + idle_seconds
    finally:
        cursor.parked = False
        cursor.after = live.after
        cursor.sent += live.pushed
