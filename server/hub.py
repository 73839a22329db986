"""Per-job high-water marks, wake-ups, and a bounded cache of already-serialized frames.

The writer publishes each committed batch here; subscribers (``server.follow``) read recent
frames from a job's cache and wait on its channel when they are at the end. The hub never
touches a socket and never holds a subscriber's backlog: a subscriber that is behind reads
what it missed from the cache or from SQLite at its own pace.

Memory is bounded twice: at most ``cache_events_per_job`` frames per job, and at most
``cache_bytes`` over all jobs (least recently published jobs are evicted first).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from .frames import Frame

# Book-keeping per channel, counted against the cache budget so that many tiny jobs cannot
# grow the channel table without bound.
_CHANNEL_OVERHEAD = 512


class JobChannel:
    """One job's live state: what has been committed (high water) and its recent frames."""

    __slots__ = (
        "_changed",
        "cached_bytes",
        "first_seq",
        "frames",
        "high_water",
        "job_id",
        "subscribers",
    )

    def __init__(self, job_id: str, high_water: int) -> None:
        self.job_id = job_id
        self.high_water = high_water
        self.frames: list[Frame] = []
        self.first_seq = high_water + 1
        self.cached_bytes = 0
        self.subscribers = 0
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

    def wake(self) -> None:
        # Waiters hold the old Event; a fresh one makes the next wait block again.
        self._changed.set()
        self._changed = asyncio.Event()


class Hub:
    def __init__(self, cache_events_per_job: int, cache_bytes: int) -> None:
        self.cache_events_per_job = cache_events_per_job
        self.cache_bytes = cache_bytes
        self.closing = False
        self._channels: OrderedDict[str, JobChannel] = OrderedDict()
        self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def attach(self, job_id: str, committed_seq: int) -> JobChannel:
        """A subscriber's handle on ``job_id``; ``committed_seq`` is a last_seq it read."""
        channel = self._channels.get(job_id)
        if channel is None:
            channel = JobChannel(job_id, committed_seq)
            self._channels[job_id] = channel
            self._total_bytes += _CHANNEL_OVERHEAD
        elif committed_seq > channel.high_water:
            channel.high_water = committed_seq
        channel.subscribers += 1
        return channel

    def detach(self, channel: JobChannel) -> None:
        channel.subscribers -= 1
        if channel.subscribers == 0 and not channel.frames:
            self._drop(channel)

    def publish(self, job_id: str, frames: list[Frame]) -> None:
        """Called by the writer after commit, with one job's new frames in seq order."""
        channel = self._channels.get(job_id)
        if channel is None:
            channel = JobChannel(job_id, frames[0].seq - 1)
            self._channels[job_id] = channel
            self._total_bytes += _CHANNEL_OVERHEAD
        else:
            self._channels.move_to_end(job_id)
        self._cache(channel, frames)
        channel.high_water = max(channel.high_water, frames[-1].seq)
        channel.wake()
        self._enforce_budget(channel)

    def close(self) -> None:
        """Shutdown: every waiting subscriber wakes up and sees ``closing``."""
        self.closing = True
        for channel in self._channels.values():
            channel.wake()

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
        added = sum(frame.size for frame in frames)
        channel.cached_bytes += added
        self._total_bytes += added
        overflow = len(channel.frames) - cap
        if overflow > 0:
            self._evict(channel, overflow)

    def _evict(self, channel: JobChannel, count: int) -> None:
        dropped = channel.frames[:count]
        freed = sum(frame.size for frame in dropped)
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
        if self._channels.get(channel.job_id) is channel:
            del self._channels[channel.job_id]
            self._total_bytes -= _CHANNEL_OVERHEAD
