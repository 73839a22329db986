"""A committed event as the bytes every transport sends: serialized once, shared by all.

The event's JSON is produced once, at append time, stored as-is in SQLite and sent as-is on
every WebSocket. The SSE encoding wraps the same bytes and is built at most once per event,
the first time an SSE subscriber needs it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import orjson

from .models import TERMINAL_TYPES

# A stream writes a batch of frames in parts of about this many bytes, waiting for the peer
# between them (aiohttp's transports pause writers at 64 KiB buffered).
WRITE_PART_BYTES = 64 * 1024


class Frame:
    __slots__ = (
        "_sse",
        "_ws_header",
        "event_id",
        "event_type",
        "job_id",
        "json",
        "seq",
        "terminal",
        "ts",
    )

    def __init__(
        self, job_id: str, seq: int, event_id: int, event_type: str, ts: str, json: bytes
    ) -> None:
        self.job_id = job_id
        self.seq = seq
        self.event_id = event_id
        self.event_type = event_type
        self.ts = ts
        self.json = json
        self.terminal = event_type in TERMINAL_TYPES
        self._sse: bytes | None = None
        self._ws_header: bytes | None = None

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = b"event: %s\nid: %d\ndata: %s\n\n" % (
                self.event_type.encode(),
                self.seq,
                self.json,
            )
        return self._sse

    @property
    def ws_header(self) -> bytes:
        """The WebSocket header of a final, unmasked, uncompressed text frame carrying
        ``json``: with it, a batch of frames goes out in one ``writelines``."""
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
