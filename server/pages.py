"""Replay pages shared by the subscribers of one job that read the same part of its log.

A hundred subscribers replaying one job from the start read the same pages of SQLite a
hundred times, and build a hundred copies of every frame: W5 spent most of its server CPU
there. Here the cursors that ask for the same page (job, log epoch, offset, page size) at
the same time wait for one read, and full pages stay in a small LRU bounded in bytes
(``stream.replay_share_bytes``), so that a subscriber a few pages behind another reads the
page from memory.

Only full pages are kept: a page cut by the count or the byte bound is a fixed part of an
append-only log, but a short one is the end of the log *when it was read*, and ``follow``
takes a short read as the proof that it has caught up. A short page is only shared with the
cursors whose request overlapped its read, and those are attached to the job's channel
while it is read, so every event committed after the read's snapshot is published to them.
The log's epoch is in the key: a job deleted and created again never gets the old pages.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import TYPE_CHECKING

from .frames import Frame
from .tenancy import JobKey

if TYPE_CHECKING:
    from .store import Store

# Memory of a cached frame beyond its JSON: the Frame object, its ts and type strings.
FRAME_OVERHEAD = 200

PageKey = tuple[JobKey, str | None, int, int, int]  # job, epoch, after, limit, max_bytes


class _ReadAbandoned(Exception):
    """The cursor that was reading a page went away (or its read failed) before the page
    was read: the cursors waiting for it read it themselves."""


class SharedPages:
    __slots__ = ("_done", "_reading", "bytes", "max_bytes", "reads", "shared")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0  # kept pages' JSON plus FRAME_OVERHEAD per frame
        self.reads = 0  # pages read from SQLite through here
        self.shared = 0  # frames handed out without a read of their own
        self._done: OrderedDict[PageKey, tuple[list[Frame], int]] = OrderedDict()
        self._reading: dict[PageKey, asyncio.Future[list[Frame]]] = {}

    async def read(
        self,
        store: Store,
        job: JobKey,
        epoch: str | None,
        after: int,
        limit: int,
        max_bytes: int,
    ) -> list[Frame]:
        """``store.read_after(job, after, limit, max_bytes=max_bytes)``, shared (the list
        returned may be another cursor's too: callers never change it)."""
        page: PageKey = (job, epoch, after, limit, max_bytes)
        kept = self._done.get(page)
        if kept is not None:
            self._done.move_to_end(page)
            self.shared += len(kept[0])
            return kept[0]
        reading = self._reading.get(page)
        if reading is not None:
            try:
                # Shielded: this cursor going away must not cancel the read for the others.
                frames = await asyncio.shield(reading)
            except _ReadAbandoned:
                return await store.read_after(job, after, limit, max_bytes=max_bytes)
            self.shared += len(frames)
            return frames
        reading = asyncio.get_running_loop().create_future()
        self._reading[page] = reading
        try:
            self.reads += 1
            frames = await store.read_after(job, after, limit, max_bytes=max_bytes)
        except BaseException:
            del self._reading[page]
            reading.set_exception(_ReadAbandoned())
            reading.exception()  # retrieved: nobody may be waiting, and that is fine
            raise
        del self._reading[page]
        reading.set_result(frames)
        self._keep(page, frames, limit, max_bytes)
        return frames

    def _keep(self, page: PageKey, frames: list[Frame], limit: int, max_bytes: int) -> None:
        json_bytes = sum(len(frame.json) for frame in frames)
        if len(frames) < limit and json_bytes < max_bytes:
            return  # a short page: the end of the log when it was read (see above)
        size = json_bytes + FRAME_OVERHEAD * len(frames)
        if size > self.max_bytes:
            return
        self._done[page] = (frames, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._done.popitem(last=False)
            self.bytes -= evicted

    def forget(self, job: JobKey) -> None:
        """Drop ``job``'s kept pages (its channel is gone: nobody is replaying it)."""
        if not self._done:
            return
        for page in [page for page in self._done if page[0] == job]:
            _, size = self._done.pop(page)
            self.bytes -= size
