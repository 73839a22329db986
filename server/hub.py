"""Per-job high-water marks, wake-ups, and a bounded cache of already-serialized frames.

The writer publishes each committed batch here; subscribers (``server.follow``) read recent
frames from a job's cache and wait on its channel when they are at the end. A subscriber that
parks there instead (``LiveSubscriber``: a WebSocket whose socket is not backed up) is handed
new frames by the publisher itself, in the same loop step, as a raw fan-out would: no task
wake-up per subscriber per event, and no task at all while it is parked (the channel calls it
back to push, to wake it, and when it is due a heartbeat). The hub never holds a subscriber's
backlog: one that
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

from .feed import FeedChannel
from .frames import WRITE_PART_BYTES, Frame
from .metrics import FramesSent
from .pages import SharedPages
from .tenancy import JobKey

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
    """A cursor that can park at the end of a job's log (``JobChannel.park``): ``after`` is
    its position and ``sent`` the frames handed to it, both advanced by the publisher as it
    pushes. A parked subscriber needs no task of its own: the channel calls it back.
    Subclasses (a WebSocket's sender) say how: ``push`` hands it frames now or returns
    False; ``wake`` tells it to read for itself (it is no longer parked); ``idle`` says that
    nothing was sent to it for its ``idle_seconds`` (time for a heartbeat). This base takes
    no pushes and sends no heartbeat: it is only ever woken."""

    __slots__ = ("_idle_group", "after", "idle_seconds", "last_sent", "parked", "sent")

    def __init__(self, after: int) -> None:
        self.after = after
        self.sent = 0
        # Parked at the end of the log, where the publisher pushes to it: nothing committed
        # is waiting for it (the lag metric counts it as caught up).
        self.parked = False
        self.idle_seconds = 0.0
        self.last_sent = 0.0  # loop time it parked or was last pushed to
        # Those due a heartbeat at the same idle tick, with it, while it is parked.
        self._idle_group: set[LiveSubscriber] | None = None

    def push(self, frames: list[Frame]) -> bool:
        """Send ``frames`` now, without blocking; False if it cannot (it is then woken)."""
        return False

    def wake(self) -> None:
        """It must read for itself: something it could not take was committed, the job was
        deleted, or the server is closing. Called once per parking, after it is unparked."""

    def idle(self) -> bool:
        """Nothing was sent to it for ``idle_seconds``: True if it sent its heartbeat at once
        and stays parked, False if it goes to read (and heartbeat) for itself."""
        return False


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
        "opened",
        "sent",
        "subscribers",
    )

    def __init__(
        self, key: JobKey, high_water: int, sent: FramesSent | None = None, opened: int = 0
    ) -> None:
        self.key = key
        # ``Hub.channels_opened`` when it was made: a channel is never put back once dropped,
        # so one older than a mark has held the job, and every commit of it, since the mark.
        self.opened = opened
        self.high_water = high_water
        self.frames: list[Frame] = []
        self.first_seq = high_water + 1
        self.cached_bytes = 0
        self.subscribers = 0
        self.deleted = False  # the job was deleted: its subscribers end (4410)
        self.live: set[LiveSubscriber] = set()
        self.sent = FramesSent() if sent is None else sent  # pushes are counted here
        # Parked subscribers by the idle tick at which they are due a heartbeat.
        self._idle: dict[int, set[LiveSubscriber]] = {}
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

    def park(self, live: LiveSubscriber, idle_seconds: float) -> bool:
        """Park ``live`` at the end of the log: frames published from now on are pushed to
        it while it can take them, it is woken when it must read for itself, and asked for a
        heartbeat after ``idle_seconds`` with nothing sent (pushes restart the clock).
        False, without parking, if something past ``live.after`` is committed already (it
        was published while the caller read): the caller reads it first."""
        if self.high_water > live.after:
            return False
        loop = asyncio.get_running_loop()
        live.parked = True
        live.idle_seconds = idle_seconds
        live.last_sent = loop.time()
        self.live.add(live)
        self._idle_at(loop, live.last_sent + idle_seconds, live)
        return True

    def unpark(self, live: LiveSubscriber) -> None:
        """``live`` leaves (its stream ends): no push, wake-up or heartbeat reaches it after."""
        if live in self.live:
            self.live.remove(live)
            self._left(live)

    def _left(self, live: LiveSubscriber) -> None:
        live.parked = False
        if live._idle_group is not None:
            live._idle_group.discard(live)
            live._idle_group = None

    def _idle_at(
        self, loop: asyncio.AbstractEventLoop, deadline: float, live: LiveSubscriber
    ) -> None:
        """Call ``live.idle`` at ``deadline``, rounded up to the next idle tick.

        Not a timer each: a parked subscriber waits for as long as it is idle, and a timer
        costs ~0.5 KB per subscriber. Subscribers due within the same tick share one timer."""
        tick = math.ceil(deadline / _IDLE_TICK)
        waiting = self._idle.get(tick)
        if waiting is None:
            waiting = self._idle[tick] = set()
            loop.call_at(tick * _IDLE_TICK, self._expire, tick)
        waiting.add(live)
        live._idle_group = waiting

    def _expire(self, tick: int) -> None:
        waiting = self._idle.pop(tick, None)
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for live in list(waiting):
            if live._idle_group is not waiting:
                continue  # it left while another was called back
            due = live.last_sent + live.idle_seconds
            if math.ceil(due / _IDLE_TICK) > tick:  # pushed to since: not idle that long
                self._idle_at(loop, due, live)
            elif _idled(live):  # it sent its heartbeat and stays parked
                live.last_sent = now
                self._idle_at(loop, now + live.idle_seconds, live)
            else:  # it reads, and heartbeats, for itself
                self.live.discard(live)
                live.parked = False
                live._idle_group = None

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
            count = len(frames)
            stalled = []
            for live in self.live:
                if live.after >= last:
                    continue
                if pushable and live.after == first - 1 and _pushed(live, frames):
                    live.after = last
                    live.sent += count
                    live.last_sent = now
                    self.sent.push += count
                else:
                    stalled.append(live)
            for live in stalled:
                self.live.remove(live)
                self._left(live)
                live.wake()
        self.wake()

    def wake(self) -> None:
        # Waiters hold the old Event; a fresh one makes the next wait block again.
        self._changed.set()
        self._changed = asyncio.Event()

    def wake_all(self) -> None:
        woken = list(self.live)
        self.live.clear()
        self._idle.clear()
        for live in woken:
            live.parked = False
            live._idle_group = None
            live.wake()
        self.wake()


def _bytes(frames: list[Frame]) -> int:
    return sum(frame.size for frame in frames)


def _pushed(live: LiveSubscriber, frames: list[Frame]) -> bool:
    try:
        return live.push(frames)
    except Exception:
        return False  # woken, it meets the error itself and ends the stream properly


def _idled(live: LiveSubscriber) -> bool:
    try:
        return live.idle()
    except Exception:
        return False


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
        # Channels made so far: a subscriber notes it before it reads a job's head, and its
        # cursor knows from it whether the channel it attaches to saw every commit since
        # (``server.follow.JobReader``).
        self.channels_opened = 0
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
            channel = self._open(key, committed_seq)
        elif committed_seq > channel.high_water:
            channel.high_water = committed_seq
        channel.subscribers += 1
        return channel

    def _open(self, key: JobKey, high_water: int) -> JobChannel:
        channel = JobChannel(key, high_water, self.frames_sent, self.channels_opened)
        self.channels_opened += 1
        self._channels[key] = channel
        self._total_bytes += _CHANNEL_OVERHEAD
        return channel

    def detach(self, channel: JobChannel) -> None:
        channel.subscribers -= 1
        if channel.subscribers == 0 and not channel.frames:
            self._drop(channel)

    def publish(self, key: JobKey, frames: list[Frame]) -> None:
        """Called by the writer after commit, with one job's new frames in seq order."""
        channel = self._channels.get(key)
        if channel is None:
            channel = self._open(key, frames[0].seq - 1)
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
