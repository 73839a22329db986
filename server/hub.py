"""Per-job high-water marks, wake-ups, and a bounded cache of already-serialized frames.

The writer publishes each committed batch here; subscribers (``server.follow``) read recent
frames from a job's cache and wait on its channel when they are at the end. A subscriber that
waits with a push function (``LiveSubscriber``: a WebSocket whose socket is not backed up) is
handed new frames by the publisher itself, in the same loop step, as a raw fan-out would: no
task wake-up per subscriber per event. The hub never holds a subscriber's backlog: one that
cannot take a push at once (its socket is backed up, the frames end the job, it is not
contiguous) is woken instead and reads what it missed from the cache or SQLite at its own pace.

Memory is bounded twice: at most ``cache_events_per_job`` frames per job, and at most
``cache_bytes`` over all jobs (least recently published jobs are evicted first).

The feed's channel (``server.feed.FeedChannel``: the global high-water id and recent frames
across all jobs) lives here too and is published to after the per-job channels.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable

from .feed import FeedChannel
from .frames import WRITE_PART_BYTES, Frame
from .metrics import FramesSent
from .pages import SharedPages
from .tenancy import JobKey

# Sends frames to a subscriber now, without blocking; False if it cannot (it then reads them).
PushFn = Callable[[list[Frame]], bool]

# Parked subscribers' idle deadlines are rounded up to a multiple of this (seconds), so that
# those parked at about the same time share one loop timer; a heartbeat is at most this late.
_IDLE_TICK = 0.05

# Book-keeping per channel, counted against the cache budget so that many tiny jobs cannot
# grow the channel table without bound.
_CHANNEL_OVERHEAD = 512

# Deleted jobs remembered for subscribers that read a job's head before a deletion and
# attach after it (``Hub.deleted_since``); older ones are answered "unknown".
_DELETIONS_REMEMBERED = 4_096


class LiveSubscriber:
    """A subscriber parked at the end of a job's log: ``after`` is its position, advanced by
    the publisher as it pushes; ``woken`` resolves when it must read for itself."""

    __slots__ = ("after", "last_push", "push", "pushed", "woken")

    def __init__(self, after: int, push: PushFn) -> None:
        self.after = after
        self.push = push
        self.pushed = 0  # frames pushed while parked
        self.last_push: float | None = None  # loop time of the last push
        self.woken: asyncio.Future[bool] | None = None

    def wake(self) -> None:
        if self.woken is not None and not self.woken.done():
            self.woken.set_result(True)


class JobChannel:
    """One job's live state: what has been committed (high water) and its recent frames."""

    __slots__ = (
        "_changed",
        "_idle",
        "cached_bytes",
        "deleted",
        "first_seq",
        "frames",
        "high_water",
        "key",
        "live",
        "subscribers",
    )

    def __init__(self, key: JobKey, high_water: int) -> None:
        self.key = key
        self.high_water = high_water
        self.frames: list[Frame] = []
        self.first_seq = high_water + 1
        self.cached_bytes = 0
        self.subscribers = 0
        self.deleted = False  # the job was deleted: its subscribers end (4410)
        self.live: dict[int, LiveSubscriber] = {}
        # Parked subscribers' futures by the idle tick at which they time out.
        self._idle: dict[int, set[asyncio.Future[bool]]] = {}
        self._changed = asyncio.Event()

    def frames_after(self, after: int, limit: int) -> list[Frame] | None:
        """Frames with ``seq > after`` from the cache: [] if none is committed yet, None if the
        cache does not reach back to ``after + 1`` (the caller reads SQLite instead)."""
        if self.frames:
            index = after + 1 - self.first_seq
            if 0 <= index < len(self.frames):
                return self.frames[index : index + limit]
        if after >= self.high_water:
            return []
        return None

    async def wait_beyond(self, after: int, timeout: float) -> bool:
        """Wait until something past ``after`` is committed; False on timeout."""
        if self.high_water > after:
            return True
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_pushed(self, live: LiveSubscriber, timeout: float) -> bool:
        """Park ``live`` at the end of the log; frames published meanwhile are pushed to it.
        True when it must read for itself, False when ``timeout`` passes first."""
        if self.high_water > live.after:
            return True
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[bool] = loop.create_future()
        live.woken = woken
        self.live[id(live)] = live
        tick = self._expire_at(loop, loop.time() + timeout, woken)
        try:
            return await woken
        finally:
            expiring = self._idle.get(tick)
            if expiring is not None:
                expiring.discard(woken)
            self.live.pop(id(live), None)
            live.woken = None

    def _expire_at(
        self, loop: asyncio.AbstractEventLoop, deadline: float, woken: asyncio.Future[bool]
    ) -> int:
        """Resolve ``woken`` with False at ``deadline``, rounded up to the next idle tick.

        Not asyncio.timeout() and not a timer each: a parked subscriber waits here for as
        long as it is idle, and a Timeout plus a loop timer cost ~0.8 KB per subscriber.
        Subscribers parked within the same tick share one timer."""
        tick = math.ceil(deadline / _IDLE_TICK)
        expiring = self._idle.get(tick)
        if expiring is None:
            expiring = self._idle[tick] = set()
            loop.call_at(tick * _IDLE_TICK, self._expire, tick)
        expiring.add(woken)
        return tick

    def _expire(self, tick: int) -> None:
        for woken in self._idle.pop(tick, ()):
            if not woken.done():
                woken.set_result(False)

    def deliver(self, frames: list[Frame]) -> None:
        """Push newly committed ``frames`` to the parked subscribers that can take them now;
        wake the others, and every plain waiter."""
        if self.live:
            first, last = frames[0].seq, frames[-1].seq
            # A terminal event is sent by the subscriber's own task, which then closes; so is
            # a batch larger than one write part, in parts with a drain between them: nobody
            # waits on a push, so it must not hand any one socket more than a part.
            pushable = not frames[-1].terminal and _bytes(frames) <= WRITE_PART_BYTES
            now = asyncio.get_running_loop().time()
            stalled = []
            for key, live in self.live.items():
                if live.after >= last:
                    continue
                if pushable and live.after == first - 1 and _pushed(live, frames):
                    live.after = last
                    live.pushed += len(frames)
                    live.last_push = now
                else:
                    stalled.append(key)
            for key in stalled:
                self.live.pop(key).wake()
        self.wake()

    def wake(self) -> None:
        # Waiters hold the old Event; a fresh one makes the next wait block again.
        self._changed.set()
        self._changed = asyncio.Event()

    def wake_all(self) -> None:
        for live in self.live.values():
            live.wake()
        self.live.clear()
        self.wake()


def _bytes(frames: list[Frame]) -> int:
    return sum(frame.size for frame in frames)


def _pushed(live: LiveSubscriber, frames: list[Frame]) -> bool:
    try:
        return live.push(frames)
    except Exception:
        return False  # its own task will meet the error and end the stream properly


class Hub:
    def __init__(
        self,
        cache_events_per_job: int,
        cache_bytes: int,
        feed_cache_events: int = 8_192,
        feed_cache_bytes: int = 16 * 1024 * 1024,
        replay_share_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.cache_events_per_job = cache_events_per_job
        self.cache_bytes = cache_bytes
        self.feed = FeedChannel(feed_cache_events, feed_cache_bytes)
        # Replay pages read from SQLite, shared by a job's subscribers (server.pages).
        self.pages = SharedPages(replay_share_bytes)
        self.closing = False
        self.frames_sent = FramesSent()  # job streams' (GET /metrics)
        # Keyed by (tenant, job_id): two tenants' jobs of the same id never share a channel.
        self._channels: OrderedDict[JobKey, JobChannel] = OrderedDict()
        self._total_bytes = 0
        # Deletions so far, and the most recent ones' numbers by job (``deleted_since``).
        self.deletions = 0
        self._deleted: OrderedDict[JobKey, int] = OrderedDict()

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def high_water(self, key: JobKey) -> int | None:
        """The last seq of job ``key`` the hub knows committed; None if no channel holds it
        (no subscriber follows it and nothing of it is cached)."""
        channel = self._channels.get(key)
        return None if channel is None else channel.high_water

    def attach(self, key: JobKey, committed_seq: int) -> JobChannel:
        """A subscriber's handle on job ``key``; ``committed_seq`` is a last_seq it read."""
        channel = self._channels.get(key)
        if channel is None:
            channel = JobChannel(key, committed_seq)
            self._channels[key] = channel
            self._total_bytes += _CHANNEL_OVERHEAD
        elif committed_seq > channel.high_water:
            channel.high_water = committed_seq
        channel.subscribers += 1
        return channel

    def detach(self, channel: JobChannel) -> None:
        channel.subscribers -= 1
        if channel.subscribers == 0 and not channel.frames:
            self._drop(channel)

    def publish(self, key: JobKey, frames: list[Frame]) -> None:
        """Called by the writer after commit, with one job's new frames in seq order."""
        channel = self._channels.get(key)
        if channel is None:
            channel = JobChannel(key, frames[0].seq - 1)
            self._channels[key] = channel
            self._total_bytes += _CHANNEL_OVERHEAD
        else:
            self._channels.move_to_end(key)
        self._cache(channel, frames)
        channel.high_water = max(channel.high_water, frames[-1].seq)
        channel.deliver(frames)
        self._enforce_budget(channel)

    def forget_jobs(self, keys: list[JobKey]) -> None:
        """Jobs ``keys`` were deleted (called by the writer's task after the deletion
        committed): their cached frames go, here and in the feed's cache, so nothing deleted
        is replayed from memory, and every subscriber of them wakes up and ends (4410). A job
        created again under the same id gets a new channel."""
        for key in keys:
            self.deletions += 1
            self._deleted.pop(key, None)
            self._deleted[key] = self.deletions
            channel = self._channels.get(key)
            if channel is not None:
                self._evict(channel, len(channel.frames))
                self._drop(channel)
                channel.deleted = True
                channel.wake_all()
        while len(self._deleted) > _DELETIONS_REMEMBERED:
            self._deleted.popitem(last=False)
        self.feed.forget_jobs(set(keys))

    def deleted_since(self, key: JobKey, mark: int) -> bool | None:
        """Whether job ``key`` was deleted after ``deletions`` was ``mark``; None when that
        is too long ago to know (the caller then reads the job's head again)."""
        number = self._deleted.get(key)
        if number is not None and number > mark:
            return True
        if self._deleted and next(iter(self._deleted.values())) > mark + 1:
            return None  # deletions after mark may have been forgotten
        return False

    def publish_feed(self, frames: list[Frame]) -> None:
        """Called by the writer after commit (and after ``publish`` for each job) with the
        whole group's frames in id order: the feed sees the global log in commit order."""
        self.feed.publish(frames)

    def close(self) -> None:
        """Shutdown: every waiting subscriber wakes up and sees ``closing``."""
        self.closing = True
        for channel in self._channels.values():
            channel.wake_all()
        self.feed.close()

    def _cache(self, channel: JobChannel, frames: list[Frame]) -> None:
        cap = self.cache_events_per_job
        if cap == 0:
            return
        if channel.frames and channel.frames[-1].seq != frames[0].seq - 1:
            # Not contiguous (the channel was created from a stale last_seq): start afresh.
            self._evict(channel, len(channel.frames))
        if not channel.frames:
            channel.first_seq = frames[0].seq
        channel.frames.extend(frames)
        added = _bytes(frames)
        channel.cached_bytes += added
        self._total_bytes += added
        overflow = len(channel.frames) - cap
        if overflow > 0:
            self._evict(channel, overflow)

    def _evict(self, channel: JobChannel, count: int) -> None:
        dropped = channel.frames[:count]
        freed = _bytes(dropped)
        del channel.frames[:count]
        channel.first_seq += count
        channel.cached_bytes -= freed
        self._total_bytes -= freed

    def _enforce_budget(self, keep: JobChannel) -> None:
        if self._total_bytes <= self.cache_bytes:
            return
        for channel in list(self._channels.values()):
            if self._total_bytes <= self.cache_bytes:
                return
            if channel is keep:
                continue
            self._evict(channel, len(channel.frames))
            if channel.subscribers == 0:
                self._drop(channel)
        while self._total_bytes > self.cache_bytes and keep.frames:
            self._evict(keep, max(1, len(keep.frames) // 2))

    def _drop(self, channel: JobChannel) -> None:
        if self._channels.get(channel.key) is channel:
            del self._channels[channel.key]
            self._total_bytes -= _CHANNEL_OVERHEAD
            self.pages.forget(channel.key)
