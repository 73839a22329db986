"""``AsyncFeed``: follow the events of many jobs on one cursor (``GET /v1/feed``), each
matching event once, in commit order, across drops and restarts; it never ends by itself.

The cursor is the server-wide event ``id``: strictly increasing, with holes (other jobs'
events, filtered out). ``after`` is the position held: every matching event with
``id <= after`` has been handed out. It moves with each event and with each heartbeat's
``last_id`` (the position the server has *scanned*), so a sparse filter resumes past what
was scanned instead of scanning it again. The attempts, their outcomes and the backoff are
``ResumingStream``'s (``resuming.py``); unlike a job stream, a close 1000 or the end of an
SSE response is resumed too.

``after=None`` starts "from now": the first hello's ``after`` becomes the position. With
``snapshots=True`` (and no ``after``) the iteration first yields a ``Snapshot`` for every
matching unfinished job, consistent with that position, then the events after it. The
snapshots are asked for once: a connection lost while they are still arriving resumes from
their position, and the rest of them are not sent again (the server marks no end of the
snapshots; docs/python-client.md says so).

``epoch`` is the log's identity from the first hello (the server database's generation):
every resume sends it with ``after``, and a log that is not that one any more (the database
was restored from a backup, or replaced) raises ``LogReset`` instead of handing out other
events under ids already seen, as a job stream does. A feed started with an ``after`` from
an earlier run should be given that run's ``epoch`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ProtocolViolation, error_from_close
from .events import Event, Snapshot
from .resuming import Resume, ResumingStream, Transport

if TYPE_CHECKING:
    from .client import AsyncClient

FeedItem = Event | Snapshot


def _values(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class AsyncFeed(ResumingStream[FeedItem]):
    """Iterate with ``async for item in feed``: ``Snapshot`` items first (``snapshots=True``),
    then ``Event`` items. While it runs, ``after`` is the position to resume from (None until
    the first hello when started "from now"), ``epoch`` the log's identity (None until the
    first hello unless given), ``resumes`` how many times it reconnected,
    ``state`` one of ``connecting``, ``live``, ``waiting``."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        after: int | None = None,
        job: str | Iterable[str] | None = None,
        prefix: str | None = None,
        kind: str | Iterable[str] | None = None,
        type: str | Iterable[str] | None = None,
        snapshots: bool = False,
        epoch: str | None = None,
        transport: Transport = "websocket",
    ) -> None:
        super().__init__(client, transport)
        if after is not None and after < 0:
            raise ValueError("after must be >= 0")
        if snapshots and after is not None:
            raise ValueError("snapshots=True starts from now: it cannot be given an after")
        self.after = after
        self.jobs = _values(job)
        self.prefix = prefix
        self.kinds = _values(kind)
        self.types = _values(type)
        self.snapshots = snapshots
        self.epoch = epoch

    def _url(self) -> str:
        return f"{self._client.url}/v1/feed"

    def _params(self) -> Sequence[tuple[str, str]]:
        params: list[tuple[str, str]] = [("job", value) for value in self.jobs]
        if self.prefix:
            params.append(("prefix", self.prefix))
        params += [("kind", value) for value in self.kinds]
        params += [("type", value) for value in self.types]
        if self.after is not None:
            params.append(("after", str(self.after)))
            if self.epoch:
                params.append(("epoch", self.epoch))
        elif self.snapshots:
            # Only until the first hello: from then on the position is known, and the
            # server sends snapshots only to a subscription without one.
            params.append(("snapshots", "1"))
        return params

    def _sse_headers(self) -> dict[str, str]:
        # The position a browser's EventSource would resume from (the server reads it first;
        # ``after`` in the query says the same).
        return {} if self.after is None else {"Last-Event-ID": str(self.after)}

    def _closed_normally(self) -> Exception:
        return Resume("the feed closed")  # a feed never ends by itself

    def _accept(self, frame: dict[str, Any]) -> FeedItem | None:
        """The item to hand out for ``frame``, after checking its place; None for control
        frames (hello and heartbeat move the position)."""
        kind = frame.get("type")
        if "seq" in frame:
            event_id = frame.get("id")
            if not isinstance(event_id, int) or (self.after is not None and event_id <= self.after):
                raise ProtocolViolation(
                    f"feed: expected an id after {self.after}, got {event_id!r}"
                )
            self.after = event_id
            return Event.from_dict(frame)
        if kind == "snapshot":
            job = frame.get("job")
            if not isinstance(job, dict):
                raise ProtocolViolation(f"feed: a snapshot frame without a job: {frame!r}")
            return Snapshot.from_dict(job)
        if kind == "hello":
            start = frame.get("after")
            if not isinstance(start, int) or (self.after is not None and start != self.after):
                raise ProtocolViolation(f"feed: hello from {start!r}, asked for {self.after}")
            epoch = frame.get("epoch")
            if self.epoch is not None and isinstance(epoch, str) and epoch != self.epoch:
                # Not sent by a server that got our epoch (it refuses with 4409 / 409).
                raise error_from_close(
                    4409,
                    {
                        "code": "log_reset",
                        "message": f"the feed is epoch {epoch}, not {self.epoch}",
                    },
                )
            if isinstance(epoch, str):
                self.epoch = epoch
            self.after = start
            self._accepted(frame)
        elif kind == "heartbeat":
            scanned = frame.get("last_id")
            if isinstance(scanned, int) and self.after is not None and scanned > self.after:
                self.after = scanned
        return None
