"""The transport-free cursor: replay a job's log from an offset, then follow it live.

A subscriber is a position (``after``) in one job's log. Each step sends what lies past that
position — from the hub's cache of recent frames when it reaches back far enough, else from
SQLite — and advances the position to the last seq sent. At the end of the log it waits on the
job's channel. Because the position only moves to seqs actually read, in order, there is no
hole and no duplicate however replay and appends interleave, and a slow subscriber only falls
behind: nothing is queued for it anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from .errors import InvalidParameter, LogReset
from .frames import Frame
from .hub import Hub
from .store import JobHead, Store


class StreamClosing(Exception):
    """The server is shutting down; the subscriber should resume elsewhere (1001)."""


@dataclass
class Cursor:
    """Where a subscriber is: ``after`` is the last seq it was sent (its resume offset)."""

    job_id: str
    after: int
    sent: int = 0
    done: bool = False


def check_offset(job_id: str, head: JobHead, after: int, epoch: str | None) -> None:
    """Refuse a resume point that is not in the job's log as it is now.

    Without ``epoch`` only the offset is checked: ``after`` past ``last_seq`` is a bad
    parameter. With ``epoch`` (the one the subscriber saw in its earlier ``hello``), a
    different epoch means another log under the same job id (re-created job, other or wiped
    database), and the same epoch with ``after`` past ``last_seq`` means the log lost events
    the subscriber already had (restored from an older backup): both are ``LogReset``.
    """
    if epoch is not None:
        if epoch != head.epoch:
            raise LogReset(
                f"job {job_id}'s log is epoch {head.epoch}, not {epoch}: the job was "
                "re-created or the database replaced; start again from after=0"
            )
        if after > head.last_seq:
            raise LogReset(
                f"after={after} is past the end of job {job_id}'s log ({head.last_seq}) in "
                "the same epoch: the log lost events you had (restored from a backup); "
                "start again from after=0"
            )
    if after > head.last_seq:
        raise InvalidParameter(f"after={after} is past the end of the log ({head.last_seq})")


async def follow(
    store: Store,
    hub: Hub,
    cursor: Cursor,
    head: JobHead,
    *,
    page_events: int,
    idle_seconds: float,
) -> AsyncIterator[list[Frame] | None]:
    """Yield batches of frames past ``cursor.after`` in order; ``None`` after
    ``idle_seconds`` without any (time for a heartbeat). Ends after the terminal event.

    ``head`` is the job's status and last_seq read before the caller sent its hello, so
    that a finished job whose log the subscriber already has ends at once.
    """
    if head.status in ("completed", "failed", "cancelled") and cursor.after >= head.last_seq:
        cursor.done = True
        return
    channel = hub.attach(cursor.job_id, head.last_seq)
    # `head` may be stale: events committed after it was read, while no channel held this job,
    # are not in the channel's high-water mark. One read of SQLite after attaching covers
    # them; from then on every commit is published to this (now pinned) channel.
    verified = False
    try:
        while True:
            if hub.closing:
                raise StreamClosing()
            frames = channel.frames_after(cursor.after, page_events)
            if frames is None or (not frames and not verified):
                frames = await store.read_after(cursor.job_id, cursor.after, page_events)
                # Only a short page proves the read reached the end of the log.
                verified = verified or len(frames) < page_events
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
            if not await channel.wait_beyond(cursor.after, idle_seconds) and not hub.closing:
                yield None
    finally:
        hub.detach(channel)
