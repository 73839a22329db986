"""The transport-free cursor: replay a job's log from an offset, then follow it live.

A subscriber is a position (``after``) in one job's log. Each step sends what lies past that
position — from the hub's cache of recent frames when it reaches back far enough, else from
SQLite — and advances the position to the last seq sent. At the end of the log it waits on the
job's channel. Because the position only moves to seqs actually read, in order, there is no
hole and no duplicate however replay and appends interleave, and a slow subscriber only falls
behind: nothing is queued for it anywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .errors import JobDeleted
from .frames import Frame, within_bytes
from .hub import Hub, JobChannel, LiveSubscriber, PushFn
from .store import JobHead, Store
from .tenancy import JobKey


class StreamClosing(Exception):
    """The server is shutting down; the subscriber should resume elsewhere (1001)."""


@dataclass(slots=True)
class Cursor:
    """Where a subscriber is: ``after`` is the last seq it was sent (its resume offset)."""

    key: JobKey
    after: int
    sent: int = 0
    done: bool = False
    # Parked at the end of the log, where the publisher pushes to it (``after`` is then
    # the live subscriber's, not this one's): nothing committed is waiting for it.
    parked: bool = False


async def follow(
    store: Store,
    hub: Hub,
    cursor: Cursor,
    head: JobHead,
    *,
    page_events: int,
    page_bytes: int,
    idle_seconds: float,
    push: PushFn | None = None,
    deletion_mark: int | None = None,
) -> AsyncIterator[list[Frame] | None]:
    """Yield batches of frames past ``cursor.after`` in order; ``None`` after
    ``idle_seconds`` without any (time for a heartbeat). Ends after the terminal event.

    With ``push``, a cursor at the end of the log parks on the channel and the publisher
    sends it new frames directly (advancing the cursor); the generator resumes only when
    the subscriber must read for itself, or to heartbeat.

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
            if push is not None:
                before = cursor.sent
                idle = not await _park(channel, cursor, push, idle_seconds)
                sent.push += cursor.sent - before
            else:
                idle = not await channel.wait_beyond(cursor.after, idle_seconds)
            if idle and not hub.closing:
                yield None
    finally:
        hub.detach(channel)


async def _park(channel: JobChannel, cursor: Cursor, push: PushFn, idle_seconds: float) -> bool:
    """Park at the end of the log while the publisher pushes; True when there is something
    to read, False after ``idle_seconds`` with nothing sent (pushes restart the clock)."""
    live = LiveSubscriber(cursor.after, push)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + idle_seconds
    cursor.parked = True
    try:
        while True:
            if await channel.wait_pushed(live, max(0.0, deadline - loop.time())):
                return True
            if live.last_push is None or live.last_push + idle_seconds <= loop.time():
                return False
            deadline = live.last_push + idle_seconds
    finally:
        cursor.parked = False
        cursor.after = live.after
        cursor.sent += live.pushed
