"""What both stream transports do before their first frame: admit the subscriber under the
stream caps, check its resume point against the job's log, and build the hello frame.

Every refusal is a ``ServiceError``: SSE answers it as an HTTP error, the WebSocket handler as
an error frame and a close code (``close_code_for``), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from aiohttp import web

from ..auth import READ, Principal
from ..errors import (
    Forbidden,
    InvalidParameter,
    JobDeleted,
    JobNotFound,
    LogReset,
    Overloaded,
    ServiceError,
    ShuttingDown,
    Unauthorized,
    WSClose,
)
from ..follow import Cursor, JobReader, follow
from ..frames import Frame, control_frame
from ..keys import CONFIG, HUB, STORE, STREAMS
from ..models import TERMINAL_TYPES
from ..store import JobHead
from ..streams import OpenStream
from ..tenancy import JobKey
from .request import parse_int

_CLOSE_CODES: dict[type[ServiceError], int] = {
    Overloaded: WSClose.OVERLOADED,
    ShuttingDown: WSClose.GOING_AWAY,
    JobNotFound: WSClose.JOB_NOT_FOUND,
    LogReset: WSClose.LOG_RESET,
    JobDeleted: WSClose.JOB_DELETED,
}


@dataclass(frozen=True, slots=True)
class Subscription:
    key: JobKey
    after: int
    head: JobHead
    stream: OpenStream  # its slot under the stream caps, and its connection
    deletion_mark: int = 0  # the hub's deletions before ``head`` was read (server.follow)
    channel_mark: int | None = None  # the hub's channels_opened before it (server.follow)

    @property
    def job_id(self) -> str:
        return self.key.job_id

    def hello(self) -> bytes:
        return control_frame(
            {
                "type": "hello",
                "job_id": self.job_id,
                "status": self.head.status,
                "after": self.after,
                "last_seq": self.head.last_seq,
                "epoch": self.head.epoch,
            }
        )


def follow_job(
    request: web.Request, cursor: Cursor, subscription: Subscription
) -> AsyncGenerator[list[Frame] | None, None]:
    """The job cursor with the stream settings, as batches (an SSE stream reads them)."""
    reader = job_reader(request, cursor, subscription)
    return follow(reader, idle_seconds=request.app[CONFIG].stream.heartbeat_seconds)


def job_reader(request: web.Request, cursor: Cursor, subscription: Subscription) -> JobReader:
    """The job cursor's reads with the stream settings (a WebSocket's sender drives them)."""
    config = request.app[CONFIG].stream
    return JobReader(
        request.app[STORE],
        request.app[HUB],
        cursor,
        subscription.head,
        page_events=config.page_events,
        page_bytes=config.page_bytes,
        deletion_mark=subscription.deletion_mark,
        channel_mark=subscription.channel_mark,
    )


def close_code_for(error: ServiceError) -> int:
    """The WebSocket close code for a refused subscription (4400 for a bad request)."""
    if isinstance(error, Unauthorized):
        return WSClose.UNAUTHORIZED
    if isinstance(error, Forbidden):
        return WSClose.FORBIDDEN
    return _CLOSE_CODES.get(type(error), WSClose.BAD_REQUEST)


def subscribe(
    request: web.Request,
    principal: Principal,
    job_id: str,
    raw_after: str,
    *,
    finished_past_end: bool = False,
) -> Subscribing:
    """Admit ``principal`` as a subscriber to ``job_id`` from offset ``raw_after``; its
    per-job stream slot is held until the ``async with`` block ends. Raises
    ``ServiceError`` for any refusal (a job outside its tenant or grants: ``JobNotFound``).

    ``finished_past_end``: an offset past a finished job's end (without ``epoch``) is taken
    as its end instead of refused (SSE answers both with 204, feed.md)."""
    return Subscribing(request, principal, job_id, raw_after, finished_past_end)


class Subscribing:
    """``subscribe``'s context manager. A plain class, not ``@asynccontextmanager``: the block
    lasts as long as the stream, and a suspended generator (its frame, the context manager
    around it, the loop's weak reference to it) cost about 0.6 KB per open stream."""

    __slots__ = (
        "_finished_past_end",
        "_job_id",
        "_principal",
        "_raw_after",
        "_request",
        "_stream",
    )

    def __init__(
        self,
        request: web.Request,
        principal: Principal,
        job_id: str,
        raw_after: str,
        finished_past_end: bool = False,
    ) -> None:
        self._request = request
        self._principal = principal
        self._job_id = job_id
        self._raw_after = raw_after
        self._finished_past_end = finished_past_end
        self._stream: OpenStream | None = None

    async def __aenter__(self) -> Subscription:
        request, job_id = self._request, self._job_id
        if not self._principal.allows(READ):
            raise Forbidden(f"this credential lacks the scope {READ}")
        key = self._principal.job_key(job_id)
        after = parse_int("after", self._raw_after)
        streams = request.app[STREAMS]
        # Counted before the first await, so concurrent handshakes cannot overshoot a cap.
        stream = streams.admit(request, key)
        hub = request.app[HUB]
        deletion_mark, channel_mark = hub.deletions, hub.channels_opened
        try:
            head = await request.app[STORE].job_head(key)
            if head is None:
                raise JobNotFound(job_id)
            epoch = request.query.get("epoch") or None
            if (
                self._finished_past_end
                and epoch is None
                and head.status in TERMINAL_TYPES
                and after > head.last_seq
            ):
                after = head.last_seq
            check_offset(job_id, head, after, epoch)
        except BaseException:
            streams.release(stream)
            raise
        self._stream = stream
        return Subscription(key, after, head, stream, deletion_mark, channel_mark)

    async def __aexit__(self, *exc_info: object) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._request.app[STREAMS].release(stream)


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
