"""What a job's log holds, as Python values: ``Event`` (one stored event) and ``Snapshot``
(the job's state), with ``Snapshot.apply`` folding events by the server's own rules; and the
streams' control frames as typed dicts (``JobHello``, ``FeedHello``, ``JobHeartbeat``,
``FeedHeartbeat``, ``SnapshotFrame``, ``Pong``, ``ErrorFrame``).

The frames are those the server describes at ``GET /v1/frames.schema.json``;
tests/test_frame_schema.py checks that these types name the same frames and fields.

The rules are the server's reducer (``server/snapshot.py`` and docs/protocol.md, "Snapshot"),
restated here so that the client carries no server code; tests/client/test_fold.py checks
that the two agree for arbitrary logs written to a real server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypedDict

TERMINAL_TYPES = frozenset({"completed", "failed", "cancelled"})
# The ``type`` of every frame that is not an event.
CONTROL_FRAME_TYPES = frozenset({"hello", "heartbeat", "snapshot", "pong", "error"})
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a job's log, as stored. Fields the event does not carry are None;
    ``raw`` is the event's JSON object exactly as received (unknown fields included)."""

    job_id: str
    seq: int
    id: int
    type: str
    ts: str
    progress: float | None = None
    phase: str | None = None
    message: str | None = None
    current: int | None = None
    total: int | None = None
    level: str | None = None
    data: dict[str, Any] | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    reason: str | None = None
    kind: str | None = None
    metadata: dict[str, Any] | None = None
    heartbeat_timeout: float | None = None  # created
    by: str | None = None  # failed: "server" when the server failed the job (worker_lost)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        """``completed``, ``failed`` or ``cancelled``: the last event of its job."""
        return self.type in TERMINAL_TYPES

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Event:
        known = {name: raw[name] for name in _EVENT_FIELDS if name in raw}
        return cls(**known, raw=raw)


_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(Event) if f.name != "raw")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A job's state: the protocol's snapshot (``GET /v1/jobs/{id}``), or the fold of its
    log from the ``created`` event."""

    job_id: str
    kind: str | None
    status: str
    last_seq: int
    created_at: str
    updated_at: str
    metadata: dict[str, Any] | None = None
    progress: float | None = None
    phase: str | None = None
    message: str | None = None
    current: int | None = None
    total: int | None = None
    finished_at: str | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    epoch: str | None = None
    heartbeat_timeout: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_TYPES

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Snapshot:
        values: dict[str, Any] = {name: raw.get(name) for name in _SNAPSHOT_FIELDS}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The protocol's fixed shape: every field, ``None`` where there is no value."""
        return {name: getattr(self, name) for name in _SNAPSHOT_FIELDS}

    @staticmethod
    def fold(events: Any) -> Snapshot | None:
        """The snapshot after ``events`` (an iterable of ``Event``, starting at ``created``);
        None for no events."""
        state: Snapshot | None = None
        for event in events:
            state = Snapshot.apply(state, event)
        return state

    @staticmethod
    def apply(state: Snapshot | None, event: Event) -> Snapshot:
        """The snapshot after ``event``; ``state`` is None only before ``created``."""
        if event.type == "created":
            return Snapshot(
                job_id=event.job_id,
                kind=event.kind,
                status="queued",
                last_seq=event.seq,
                created_at=event.ts,
                updated_at=event.ts,
                metadata=event.metadata,
                epoch=log_epoch(event.id, event.ts),
                heartbeat_timeout=event.heartbeat_timeout,
            )
        if state is None:
            raise ValueError(f"event {event.type!r} (seq {event.seq}) before the job's created")
        changes: dict[str, Any] = {"last_seq": event.seq, "updated_at": event.ts}
        raw = event.raw
        if event.type == "progress":
            changes["status"] = "running"
            for name in ("progress", "phase", "message", "current", "total"):
                if name in raw:
                    changes[name] = raw[name]
        elif event.type == "log":
            changes["status"] = "running"
        elif event.type in TERMINAL_TYPES:
            changes["status"] = event.type
            changes["finished_at"] = event.ts
            if event.type == "completed":
                changes["progress"] = 100.0
                changes["result"] = event.result
                if "message" in raw:
                    changes["message"] = event.message
            elif event.type == "failed":
                changes["error"] = event.error
            elif "reason" in raw:
                changes["message"] = event.reason
        # Custom events move nothing but last_seq and updated_at (not even out of queued).
        return dataclasses.replace(state, **changes)


_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(Snapshot))


def log_epoch(created_id: int, created_ts: str) -> str:
    """The log's identity as the server derives it: the created event's id, a dash, its ts
    in microseconds since 1970 in lower-case hex (docs/protocol.md, "The log's epoch")."""
    micros = (datetime.fromisoformat(created_ts) - _UNIX_EPOCH) // _MICROSECOND
    return f"{created_id}-{micros:x}"


class JobHello(TypedDict):
    """A job stream's first frame."""

    type: Literal["hello"]
    job_id: str
    status: str
    after: int
    last_seq: int
    epoch: str | None


class FeedHello(TypedDict):
    """A feed's first frame: ``after`` its start, ``last_id`` the log's end then."""

    type: Literal["hello"]
    after: int
    last_id: int


class JobHeartbeat(TypedDict):
    type: Literal["heartbeat"]
    last_seq: int


class FeedHeartbeat(TypedDict):
    """``last_id``: the position the feed has scanned (``AsyncFeed`` resumes from it)."""

    type: Literal["heartbeat"]
    last_id: int


class SnapshotFrame(TypedDict):
    """A feed with ``snapshots=1``: one per matching unfinished job (``Snapshot.from_dict``
    of ``job``)."""

    type: Literal["snapshot"]
    job: dict[str, Any]


class Pong(TypedDict):
    type: Literal["pong"]


class ErrorFrame(TypedDict):
    """Sent before a final close (its ``code`` picks the ``ServerError`` class)."""

    type: Literal["error"]
    code: str
    message: str
