"""A Server-Sent Events parser (the WHATWG "event stream" rules) over byte chunks.

Lines end in CR, LF or CRLF; ``field: value`` lines build a record, a blank line dispatches
it; lines starting with ``:`` are comments (jobfeed's idle heartbeat). No line length limit
of its own: an event line is as long as the event (up to the server's
``limits.max_event_bytes``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Record:
    event: str  # "" when the record had no ``event:`` line (jobfeed's log events)
    data: str
    id: str | None


class SSEParser:
    def __init__(self) -> None:
        self._pending = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.retry_seconds: float | None = None  # the latest ``retry:`` field

    def feed(self, chunk: bytes) -> Iterator[Record]:
        """The records that ``chunk`` completes."""
        self._pending += chunk
        while True:
            cut = _line_end(self._pending)
            if cut is None:
                return
            end, after = cut
            line = self._pending[:end].decode("utf-8", errors="replace")
            self._pending = self._pending[after:]
            record = self._line(line)
            if record is not None:
                yield record

    def _line(self, line: str) -> Record | None:
        if not line:
            if not self._data and not self._event:
                return None
            record = Record(self._event, "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return record
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_seconds = int(value) / 1000
        return None


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Where the first line of ``buffer`` ends and the next begins; None if incomplete.

    A CR at the very end of the buffer may be the first half of a CRLF, so it waits for more.
    """
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 == len(buffer):
        return None
    return (cr, cr + 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, cr + 1)
