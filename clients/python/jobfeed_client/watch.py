"""``AsyncWatch``: follow one job's events, each once, in order, across drops and restarts.

Each subscription connects with ``after`` (the last seq received) and, once a hello has been
seen, the log's ``epoch``; the attempts, their outcomes and the backoff are
``ResumingStream``'s (``resuming.py``). For a job stream, close 1000, SSE 204 and the
terminal event end the iteration; an SSE response that ends without the terminal event is
resumed, unless the hello said the job is finished and its whole log is already held.

Each event is checked to be the next seq: a hole or a repeat is a ``ProtocolViolation``
rather than something to paper over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .errors import ProtocolViolation, error_from_close
from .events import TERMINAL_TYPES, Event, Snapshot
from .resuming import Done, Resume, ResumingStream, Transport

if TYPE_CHECKING:
    from .client import AsyncClient

__all__ = ["AsyncWatch", "Transport"]


class AsyncWatch(ResumingStream[Event]):
    """Iterate with ``async for event in watch``. While it runs, ``after`` is the last seq
    received, ``epoch`` the log's identity, ``snapshot`` the job's state folded from the
    events (None if it started mid-log without a ``snapshot``), ``resumes`` how many times
    it reconnected, ``state`` one of ``connecting``, ``live``, ``waiting``, ``done``."""

    def __init__(
        self,
        client: AsyncClient,
        job_id: str,
        *,
        after: int = 0,
        epoch: str | None = None,
        snapshot: Snapshot | None = None,
        transport: Transport = "websocket",
    ) -> None:
        super().__init__(client, transport)
        if snapshot is not None:
            after, epoch = snapshot.last_seq, snapshot.epoch
        if after < 0:
            raise ValueError("after must be >= 0")
        self.job_id = job_id
        self.after = after
        self.epoch = epoch
        self.snapshot = snapshot

    def _is_last(self, item: Event) -> bool:
        return item.terminal

    def _accept(self, frame: dict[str, Any]) -> Event | None:
        """The event to hand out for ``frame``, after checking its place; None for control
        frames (hello records the epoch)."""
        if "seq" not in frame:
            if frame.get("type") == "hello":
                epoch = frame.get("epoch")
                if self.epoch is not None and epoch is not None and epoch != self.epoch:
                    raise error_from_close(
                        4409,
                        {
                            "code": "log_reset",
                            "message": (
                                f"job {self.job_id}'s log is epoch {epoch}, not {self.epoch}"
                            ),
                        },
                    )
                self.epoch = epoch or self.epoch
                self._accepted(frame)
            return None
        seq = frame["seq"]
        if not isinstance(seq, int) or seq != self.after + 1:
            raise ProtocolViolation(
                f"job {self.job_id}: expected seq {self.after + 1}, got {seq!r}"
            )
        event = Event.from_dict(frame)
        if self.snapshot is not None or (event.type == "created" and self.after == 0):
            self.snapshot = Snapshot.apply(self.snapshot, event)
            if event.type == "created" and self.epoch:
                # The hello's epoch: after a restore it carries the database's generation,
                # which the created event alone does not (docs/protocol.md, the log's epoch).
                self.snapshot = dataclasses.replace(self.snapshot, epoch=self.epoch)
        self.after = seq
        return event

    def _params(self) -> Sequence[tuple[str, str]]:
        params = [("after", str(self.after))]
        if self.epoch:
            params.append(("epoch", self.epoch))
        return params

    def _url(self) -> str:
        return f"{self._client.url}/v1/jobs/{quote(self.job_id, safe='')}/stream"

    def _sse_ended(self) -> Exception:
        if self._finished_before_after():
            return Done()  # subscribed at the terminal event: hello, then the end
        # Ended without the terminal event (shutdown, a proxy's timeout): resume.
        return Resume("SSE response ended")

    def _finished_before_after(self) -> bool:
        """The latest hello said the job is finished and we already hold its whole log."""
        hello = self.hello
        return (
            hello is not None
            and hello.get("status") in TERMINAL_TYPES
            and self.after >= int(hello.get("last_seq") or 0)
        )
