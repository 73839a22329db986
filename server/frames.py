"""A committed event as the bytes every transport sends: serialized once, shared by all.

The event's JSON is produced once, at append time, stored as-is in SQLite and sent as-is on
every WebSocket. The SSE encoding wraps the same bytes and is built at most once per event,
the first time an SSE subscriber needs it.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from .models import TERMINAL_TYPES


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
