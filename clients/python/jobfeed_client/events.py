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
    # The first event after created, and the server's estimate (docs/protocol.md, "Rate and
    # ETA"): units of ``current`` per second and seconds left as of ``updated_at``, None
    # when unknown; ``rate_window`` is the estimator's state that ``apply`` goes on from.
    started_at: str | None = None
    rate: float | None = None
    eta_seconds: float | None = None
    rate_window: dict[str, float] | None = None
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
        if state.started_at is None:
            changes["started_at"] = event.ts
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
            changes.update(rate=None, eta_seconds=None, rate_window=None)
            return dataclasses.replace(state, **changes)
        # Custom events move nothing but last_seq and updated_at (not even out of queued).
        changes.update(_estimate(state, changes, event.ts))
        return dataclasses.replace(state, **changes)


_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(Snapshot))

# The server's rate estimator (server/snapshot.py, docs/protocol.md "Rate and ETA"): the same
# operations in the same order, so the numbers are the server's to the last bit.
RATE_WINDOW_SECONDS = 30.0
MIN_RATE_SECONDS = 1.0
MAX_ETA_SECONDS = 1e9


def _estimate(state: Snapshot, changes: dict[str, Any], ts: str) -> dict[str, Any]:
    """rate, eta_seconds and rate_window after a non-terminal event (nothing before the job
    has a position: ``current``, else ``progress``)."""
    current = changes.get("current", state.current)
    in_units = current is not None
    position = current if in_units else changes.get("progress", state.progress)
    if position is None:
        return {}
    before = state.current if state.current is not None else state.progress
    window = state.rate_window
    advance = seconds = 0.0
    if (
        window is not None
        and before is not None
        and (state.current is not None) == in_units
        and position >= before
    ):
        advance, seconds = window["advance"], window["seconds"]
        elapsed = 0.0 if ts == state.updated_at else _seconds_between(state.updated_at, ts)
        gain = position - before
        if elapsed or gain:
            decay = RATE_WINDOW_SECONDS / (RATE_WINDOW_SECONDS + elapsed)
            advance = advance * decay + gain
            seconds = seconds * decay + elapsed
    rate = advance / seconds if seconds >= MIN_RATE_SECONDS else None
    if in_units:
        total = changes.get("total", state.total)
        left = None if total is None else total - current
    else:
        left = 100.0 - position
    eta: float | None = None
    if left is not None and rate is not None:
        if left <= 0:
            eta = 0.0
        elif rate > 0 and left < rate * MAX_ETA_SECONDS:
            eta = left / rate
    return {
        "rate": rate if in_units else None,
        "eta_seconds": eta,
        "rate_window": {"advance": advance, "seconds": seconds},
    }


def _seconds_between(earlier: str, later: str) -> float:
    micros = (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)) // _MICROSECOND
    return micros / 1_000_000 if micros > 0 else 0.0


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
    """A feed's first frame: ``after`` its start, ``last_id`` the log's end then, ``epoch``
    the log's identity (the server database's generation)."""

    type: Literal["hello"]
    after: int
    last_id: int
    epoch: str


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
