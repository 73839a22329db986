"""A committed event as the bytes every transport sends: serialized once, shared by all.

The event's JSON is produced once, at append time, stored as-is in SQLite and sent as-is on
every WebSocket. The SSE encodings wrap the same bytes and are built at most once per event,
the first time an SSE subscriber needs them: a job stream's record carries the job's ``seq``
as its ``id:``, the feed's (``server.feed``) the server-wide event ``id``. Neither has an
``event:`` line, so that a browser's ``EventSource.onmessage`` receives every event.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import orjson

from .models import TERMINAL_TYPES
from .tenancy import DEFAULT_TENANT

# A stream writes a batch of frames in parts of about this many bytes, waiting for the peer
# between them (aiohttp's transports pause writers at 64 KiB buffered).
WRITE_PART_BYTES = 64 * 1024


class Frame:
    __slots__ = (
        "_feed_sse",
        "_sse",
        "_ws_header",
        "event_id",
        "event_type",
        "job_id",
        "json",
        "kind",
        "seq",
        "tenant",
        "terminal",
        "ts",
    )

    def __init__(
        self,
        job_id: str,
        seq: int,
        event_id: int,
        event_type: str,
        ts: str,
        json: bytes,
        kind: str | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        # The tenant never goes on the wire (events carry the public job_id only); it lets
        # what spans jobs (the feed) check each frame against a credential's tenant.
        self.tenant = tenant
        self.job_id = job_id
        self.seq = seq
        self.event_id = event_id
        self.event_type = event_type
        self.ts = ts
        self.json = json
        self.terminal = event_type in TERMINAL_TYPES
        # The job's kind: set by the writer (the feed's live filters read it); frames read
        # back for a job stream leave it None, as nothing there needs it.
        self.kind = kind
        self._sse: bytes | None = None
        self._feed_sse: bytes | None = None
        self._ws_header: bytes | None = None

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = b"id: %d\ndata: %s\n\n" % (self.seq, self.json)
        return self._sse

    @property
    def feed_sse(self) -> bytes:
        """The feed's SSE record: the position is the server-wide event id."""
        if self._feed_sse is None:
            self._feed_sse = b"id: %d\ndata: %s\n\n" % (self.event_id, self.json)
        return self._feed_sse

    @property
    def ws_header(self) -> bytes:
        """The WebSocket header of a final, unmasked, uncompressed text frame carrying
        ``json``: with it, a batch of frames goes out in one write."""
        if self._ws_header is None:
            self._ws_header = ws_text_header(len(self.json))
        return self._ws_header

    @property
    def size(self) -> int:
        return len(self.json)

    def __repr__(self) -> str:
        return f"Frame({self.job_id!r}, seq={self.seq}, type={self.event_type!r})"


def within_bytes(frames: list[Frame], max_bytes: int) -> list[Frame]:
    """The leading frames of ``frames`` while those before hold less than ``max_bytes`` of
    JSON: always at least one, at most ``max_bytes`` plus one frame."""
    held = 0
    for index, frame in enumerate(frames):
        held += len(frame.json)
        if held >= max_bytes:
            return frames[: index + 1]
    return frames


def parts_of(frames: list[Frame], max_bytes: int) -> Iterator[list[Frame]]:
    """``frames`` in consecutive parts of about ``max_bytes`` of JSON each (at least one
    frame): a transport writes a part, then waits for the peer before the next, so that it
    never buffers a whole batch for a slow reader."""
    start = held = 0
    for index, frame in enumerate(frames):
        held += len(frame.json)
        if held >= max_bytes:
            yield frames[start : index + 1]
            start, held = index + 1, 0
    if start < len(frames):
        yield frames[start:] if start else frames


_FIN_TEXT = 0x81  # FIN bit + opcode 1 (RFC 6455 section 5.2); no RSV bits: not compressed


def ws_text_header(length: int) -> bytes:
    """RFC 6455 header of a server's (unmasked) text frame of ``length`` payload bytes."""
    if length < 126:
        return struct.pack("!BB", _FIN_TEXT, length)
    if length < 1 << 16:
        return struct.pack("!BBH", _FIN_TEXT, 126, length)
    return struct.pack("!BBQ", _FIN_TEXT, 127, length)


def control_frame(payload: dict[str, Any]) -> bytes:
    """A non-event WebSocket frame (hello, heartbeat, pong, error)."""
    return orjson.dumps(payload)
