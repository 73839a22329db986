"""The transport-free cursor: replay a job's log from an offset, then follow it live.

A subscriber is a position (``after``) in one job's log. Each step sends what lies past that
position — from the hub's cache of recent frames when it reaches back far enough, else from
SQLite — and advances the position to the last seq sent. At the end of the log it waits on the
job's channel. Because the position only moves to seqs actually read, in order, there is no
hole and no duplicate however replay and appends interleave, and a slow subscriber only falls
behind: nothing is queued for it anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from .errors import JobDeleted
from .frames import Frame, within_bytes
from .hub import Hub, LiveSubscriber
from .store import JobHead, Store
from .tenancy import JobKey


class StreamClosing(Exception):
    """The server is shutting down; the subscriber should resume elsewhere (1001)."""


class Cursor(LiveSubscriber):
    """Where a subscriber is: ``after`` is the last seq it was sent (its resume offset),
    ``sent`` how many frames it was sent, ``done`` whether it reached the terminal event.
    Parked (``follow(park=True)``), the publisher advances it as it pushes."""

    __slots__ = ("done", "key")

    def __init__(self, key: JobKey, after: int) -> None:
        super().__init__(after)
        self.key = key
        self.done = False


async def follow(
    store: Store,
    hub: Hub,
    cursor: Cursor,
    head: JobHead,
    *,
    page_events: int,
    page_bytes: int,
    idle_seconds: float,
    park: bool = False,
    deletion_mark: int | None = None,
) -> AsyncGenerator[list[Frame] | None, None]:
    """Yield batches of frames past ``cursor.after`` in order; ``None`` after
    ``idle_seconds`` without any (time for a heartbeat). Ends after the terminal event.

    With ``park``, a cursor at the end of the log parks on the channel instead of waiting
    (``JobChannel.park``) and the generator yields an empty batch: the caller may then let
    it be, with no task, while the publisher pushes new frames to the cursor (advancing it)
    and calls it back when it is due a heartbeat; the caller resumes the generator when the
    cursor is woken to read for itself (or to heartbeat when it could not at once). Closing
    the generator while it is parked unparks the cursor.

    ``head`` is the job's status and last_seq read before the caller sent its hello, so
    that a finished job whose log the subscriber already has ends at once.

    A deleted job's stream raises ``JobDeleted`` (4410), whether it was parked, replaying,
    or (``deletion_mark``: ``hub.deletions`` before ``head`` was read) not yet attached.

    A batch holds at most ``page_events`` frames and ``page_bytes`` of JSON (plus one
    frame, so always at least one): what a subscriber that stops reading pins is bounded
    in bytes, whatever its events weigh.
    """
    if head.status in ("completed", "failed", "cancelled") and cursor.after >= head.last_seq:
        cursor.done = True
        return
    channel = hub.attach(cursor.key, head.last_seq)
    if deletion_mark is not None:
        deleted = hub.deleted_since(cursor.key, deletion_mark)
        if deleted is None:  # too many deletions since to tell: ask the log itself
            now = await store.job_head(cursor.key)
            deleted = now is None or now.epoch != head.epoch
        if deleted:
            hub.detach(channel)
            raise JobDeleted(cursor.key.job_id)
    sent = hub.frames_sent
    # `head` may be stale: events committed after it was read, while no channel held this job,
    # are not in the channel's high-water mark. One read of SQLite after attaching covers
    # them; from then on every commit is published to this (now pinned) channel.
    verified = False
    try:
        while True:
            if hub.closing:
                raise StreamClosing()
            if channel.deleted:
                raise JobDeleted(cursor.key.job_id)
            frames = channel.frames_after(cursor.after, page_events)
            if frames is None or (not frames and not verified):
                if channel.subscribers > 1:  # others may be reading the same pages
                    frames = await hub.pages.read(
                        store, cursor.key, head.epoch, cursor.after, page_events, page_bytes
                    )
                else:
                    frames = await store.read_after(
                        cursor.key, cursor.after, page_events, max_bytes=page_bytes
                    )
                # Only a short page proves the read reached the end of the log; one cut
                # short by bytes does not.
                verified = verified or (
                    len(frames) < page_events and sum(len(f.json) for f in frames) < page_bytes
                )
                sent.database += len(frames)
            elif frames:
                frames = within_bytes(frames, page_bytes)
                sent.cache += len(frames)
            if frames:
                cursor.after = frames[-1].seq
                cursor.sent += len(frames)
                yield frames
                if frames[-1].terminal:
                    cursor.done = True
                    return
                continue
            if hub.closing:  # checked again: close() may have run during the read above
                raise StreamClosing()
            if park:
                if channel.park(cursor, idle_seconds):
                    try:
                        yield []
                    finally:
                        channel.unpark(cursor)
            elif not await channel.wait_beyond(cursor.after, idle_seconds) and not hub.closing:
                yield None
    finally:
        hub.detach(channel)
