"""The transport-free cursor: replay a job's log from an offset, then follow it live.

A subscriber is a position (``after``) in one job's log. Each step sends what lies past that
position — from the hub's cache of recent frames when it reaches back far enough, else from
SQLite — and advances the position to the last seq sent. At the end of the log it waits on the
job's channel, or parks there (``server.hub.JobChannel.park``) to be pushed to. Because the
position only moves to seqs actually read, in order, there is no hole and no duplicate however
replay and appends interleave, and a slow subscriber only falls behind: nothing is queued for
it anywhere.

``JobReader`` is the steps; ``follow`` is them as a generator (SSE). A WebSocket's sender
calls the reader itself, from a task only while it has something to read or send, and parks
the cursor in between (``server.handlers.ws.JobSender``): an idle subscriber then holds no
task and no suspended generator.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from .errors import JobDeleted
from .frames import Frame, within_bytes
from .hub import Hub, JobChannel, LiveSubscriber
from .store import JobHead, Store
from .tenancy import JobKey


class StreamClosing(Exception):
    """The server is shutting down; the subscriber should resume elsewhere (1001)."""


class Cursor(LiveSubscriber):
    """Where a subscriber is: ``after`` is the last seq it was sent (its resume offset),
    ``sent`` how many frames it was sent, ``done`` whether it reached the terminal event.
    Parked on its job's channel, the publisher advances it as it pushes."""

    __slots__ = ("done", "key")

    def __init__(self, key: JobKey, after: int) -> None:
        super().__init__(after)
        self.key = key
        self.done = False


class JobReader:
    """A cursor's reads in one job's log: ``open`` attaches it to the job's channel,
    ``next_batch`` returns what lies past it, ``close`` detaches it.

    ``head`` is the job's status and last_seq read before the caller sent its hello, so
    that a finished job whose log the subscriber already has ends at once. A deleted job's
    stream raises ``JobDeleted`` (4410), whether it was parked, replaying, or
    (``deletion_mark``: ``hub.deletions`` before ``head`` was read) not yet attached.
    ``channel_mark`` (``hub.channels_opened`` before ``head`` was read) spares a read of
    SQLite at the cache's end when the job's channel is older than ``head`` (see ``open``).

    A batch holds at most ``page_events`` frames and ``page_bytes`` of JSON (plus one
    frame, so always at least one): what a subscriber that stops reading pins is bounded
    in bytes, whatever its events weigh.
    """

    __slots__ = (
        "_channel",
        "_channel_mark",
        "_deletion_mark",
        "_head",
        "_hub",
        "_page_bytes",
        "_page_events",
        "_store",
        "_verified",
        "cursor",
    )

    def __init__(
        self,
        store: Store,
        hub: Hub,
        cursor: Cursor,
        head: JobHead,
        *,
        page_events: int,
        page_bytes: int,
        deletion_mark: int | None = None,
        channel_mark: int | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self.cursor = cursor
        self._head = head
        self._page_events = page_events
        self._page_bytes = page_bytes
        self._deletion_mark = deletion_mark
        self._channel_mark = channel_mark
        self._channel: JobChannel | None = None
        # `head` may be stale: events committed after it was read, while no channel held
        # this job, are not in the channel's high-water mark. One read of SQLite after
        # attaching covers them; from then on every commit is published to this (now
        # pinned) channel.
        self._verified = False

    @property
    def closing(self) -> bool:
        """The server is shutting down (the hub closes every stream)."""
        return self._hub.closing

    @property
    def channel(self) -> JobChannel:
        """The job's channel, once ``open``: where the cursor waits or parks."""
        assert self._channel is not None, "the reader is not open"
        return self._channel

    async def open(self) -> bool:
        """Attach to the job's channel; False if the job is finished and the cursor is at
        its end already (the stream ends at once: there is nothing to read, ever)."""
        cursor, head, hub = self.cursor, self._head, self._hub
        if head.status in ("completed", "failed", "cancelled") and cursor.after >= head.last_seq:
            cursor.done = True
            return False
        channel = hub.attach(cursor.key, head.last_seq)
        if self._deletion_mark is not None:
            deleted = hub.deleted_since(cursor.key, self._deletion_mark)
            if deleted is None:  # too many deletions since to tell: ask the log itself
                now = await self._store.job_head(cursor.key)
                deleted = now is None or now.epoch != head.epoch
            if deleted:
                hub.detach(channel)
                raise JobDeleted(cursor.key.job_id)
        self._channel = channel
        # A channel made before ``head`` was read has held the job since (a dropped channel
        # is never put back): every commit after ``head`` was published to it, so its high
        # water is the log's end and the verifying read is not needed. A reconnect storm's
        # subscribers (W6) resume on such a channel: a thousand reads of SQLite saved.
        if self._channel_mark is not None and channel.opened < self._channel_mark:
            self._verified = True
        return True

    async def next_batch(self) -> list[Frame]:
        """The frames past ``cursor.after``, in order, moving the cursor to the last of them
        (``cursor.done`` after the terminal event); [] when the log holds nothing past it.
        Raises ``StreamClosing`` at shutdown, ``JobDeleted`` when the job is deleted."""
        hub, cursor, channel = self._hub, self.cursor, self.channel
        if hub.closing:
            raise StreamClosing()
        if channel.deleted:
            raise JobDeleted(cursor.key.job_id)
        page_events, page_bytes = self._page_events, self._page_bytes
        sent = hub.frames_sent
        frames = channel.frames_after(cursor.after, page_events)
        if frames is None or (not frames and not self._verified):
            if channel.subscribers > 1:  # others may be reading the same pages
                frames = await hub.pages.read(
                    self._store, cursor.key, self._head.epoch, cursor.after, page_events, page_bytes
                )
            else:
                frames = await self._store.read_after(
                    cursor.key, cursor.after, page_events, max_bytes=page_bytes
                )
            # Only a short page proves the read reached the end of the log; one cut short
            # by bytes does not.
            self._verified = self._verified or (
                len(frames) < page_events and sum(len(f.json) for f in frames) < page_bytes
            )
            sent.database += len(frames)
        elif frames:
            frames = within_bytes(frames, page_bytes)
            sent.cache += len(frames)
        if frames:
            cursor.after = frames[-1].seq
            cursor.sent += len(frames)
            cursor.done = frames[-1].terminal
        elif hub.closing:  # checked again: close() may have run during the read above
            raise StreamClosing()
        return frames

    def close(self) -> None:
        """Detach from the job's channel (and unpark the cursor, if it is parked there)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.unpark(self.cursor)
            self._hub.detach(channel)


async def follow(
    reader: JobReader, *, idle_seconds: float
) -> AsyncGenerator[list[Frame] | None, None]:
    """Yield batches of frames past the reader's cursor in order; ``None`` after
    ``idle_seconds`` without any (time for a heartbeat). Ends after the terminal event."""
    cursor = reader.cursor
    if not await reader.open():
        return
    try:
        while True:
            frames = await reader.next_batch()
            if frames:
                yield frames
                if cursor.done:
                    return
            elif not await reader.channel.wait_beyond(cursor.after, idle_seconds) and not (
                reader.closing
            ):
                yield None
    finally:
        reader.close()
