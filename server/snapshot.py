"""The job snapshot as a pure fold over the log: ``snapshot = reduce(apply_event, events)``.

The writer uses ``apply_event`` to update the snapshot in the same transaction as the events it
appends; tests replay stored logs through it and compare with the stored snapshot.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Generic, TypeVar

import orjson

from .models import TERMINAL_TYPES


@dataclass(frozen=True, slots=True)
class JobState:
    job_id: str
    kind: str | None
    status: str
    last_seq: int
    created_at: str
    updated_at: str
    # metadata, result and error: parsed JSON, or (in the writer's cache, see ``compact``)
    # that JSON already serialized, as bytes.
    metadata: dict[str, Any] | bytes | None = None
    progress: float | None = None
    phase: str | None = None
    message: str | None = None
    current: int | None = None
    total: int | None = None
    finished_at: str | None = None
    result: Any = None
    error: Any = None
    # The log's identity (``log_epoch`` of the created event). None only for a snapshot stored
    # before migration 0003, which backfills it; loading one must still work.
    epoch: str | None = None
    # The ts of the first event after ``created`` (None until there is one).
    started_at: str | None = None
    # The rate estimator's window (see "Rate and ETA" below), published as ``rate_window``
    # so that a client folding events onto a snapshot it was given goes on exactly as the
    # server does. ``rate`` and ``eta_seconds`` are derived from it when serialized, not
    # kept: the fold runs once per appended event, serialization once per commit. Two flat
    # floats rather than a tuple: the writer's cache measures states field by field.
    window_advance: float | None = None
    window_seconds: float | None = None
    # Seconds without an event after which the server fails the job as ``worker_lost``
    # (``server.watchdog``); from the created event. None: not watched (and for snapshots
    # stored before migration 0006, which adds it as null).
    heartbeat_timeout: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_TYPES

    @property
    def rate(self) -> float | None:
        """Units of ``current`` per second over the window; None when unknown."""
        return self._window_rate() if self.current is not None else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left as of ``updated_at``; None when unknown, 0.0 when nothing is left."""
        rate = self._window_rate()
        if rate is None:
            return None
        if self.current is not None:
            if self.total is None:
                return None  # counting, but nothing says how much is left
            left: float = self.total - self.current
        elif self.progress is not None:
            left = 100.0 - self.progress  # a job that reports only percentages
        else:
            return None
        if left <= 0:
            return 0.0
        if rate > 0 and left < rate * MAX_ETA_SECONDS:
            return left / rate
        return None  # no progress in the window, or too little to tell

    def _window_rate(self) -> float | None:
        """advance / seconds in the window's unit, once it holds MIN_RATE_SECONDS."""
        seconds = self.window_seconds
        if seconds is None or seconds < MIN_RATE_SECONDS or self.window_advance is None:
            return None
        return self.window_advance / seconds

    def to_dict(self) -> dict[str, Any]:
        """The protocol's snapshot: a fixed shape, ``null`` where there is no value."""
        window = None
        rate = eta = None
        if self.window_seconds is not None:  # else no estimate: skip the arithmetic
            window = {"advance": self.window_advance, "seconds": self.window_seconds}
            rate, eta = self.rate, self.eta_seconds
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "status": self.status,
            "progress": self.progress,
            "phase": self.phase,
            "message": self.message,
            "current": self.current,
            "total": self.total,
            "last_seq": self.last_seq,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "metadata": self.metadata,
            "result": self.result,
            "error": self.error,
            "epoch": self.epoch,
            "started_at": self.started_at,
            "rate": rate,
            "eta_seconds": eta,
            "rate_window": window,
            "heartbeat_timeout": self.heartbeat_timeout,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), default=_embed_serialized)

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobState:
        """A stored snapshot; one stored before migration 0007 (no rate fields) loads too."""
        values = orjson.loads(raw)
        values.pop("rate", None)  # derived from the window
        values.pop("eta_seconds", None)
        window = values.pop("rate_window", None)
        if window is not None:
            values["window_advance"] = window["advance"]
            values["window_seconds"] = window["seconds"]
        return cls(**values)

    def compact(self) -> JobState:
        """This state with its opaque JSON values (metadata, result, error) held as their
        serialized bytes: the fold never looks inside them, and parsed JSON can cost tens
        of times its text. ``to_json`` is unchanged. (No JSON value parses to ``bytes``, so
        bytes there always mean "already serialized".)"""
        changes = {
            name: exact_bytes(orjson.dumps(value))
            for name in _OPAQUE_FIELDS
            if (value := getattr(self, name)) is not None and not isinstance(value, bytes)
        }
        return _evolve(self, changes) if changes else self

    def measured_bytes(self) -> int:
        """The memory this state holds: itself and every value it refers to. Exact for a
        compacted state, whose values are all flat (str, int, float, bytes); a value shared
        with others (an interned status string) is counted anyway, erring high."""
        size = sys.getsizeof(self)
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if value is not None:
                size += sys.getsizeof(value)
        return size


def exact_bytes(raw: bytes) -> bytes:
    """A copy of ``raw`` that holds exactly its length. orjson's output keeps the buffer it
    was written into (4 KiB at least, megabytes for a large value): 100,000 small events kept
    as orjson returned them took 393 MiB of RSS, copied 17 MiB. Worth it for what is kept."""
    return bytes(memoryview(raw))


_OPAQUE_FIELDS = ("metadata", "result", "error")
_FIELD_NAMES = tuple(f.name for f in fields(JobState))


def _embed_serialized(value: object) -> orjson.Fragment:
    """orjson's hook for what it cannot serialize: a compacted state's bytes go out as the
    JSON they already are."""
    if isinstance(value, bytes):
        return orjson.Fragment(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def log_epoch(created_id: int, created_ts: str, generation_suffix: str = "") -> str:
    """The identity of a job's log: ``{created event id}-{created ts in µs since 1970, hex}``,
    then ``generation_suffix`` (empty until the database is restored: ``server.generation``).

    A job deleted and re-created, or the same job id in another (or a wiped) database, gets
    another epoch even when its created event has the same id, because its ts differs.
    Migration 0003 computes the same string in SQL for snapshots stored before epochs.
    """
    micros = (datetime.fromisoformat(created_ts) - _UNIX_EPOCH) // _MICROSECOND
    return f"{created_id}-{micros:x}{generation_suffix}"


_PROGRESS_FIELDS = ("progress", "phase", "message", "current", "total")


class CountsOutOfRange(ValueError):
    """A progress event's current would exceed the job's total (or the reverse)."""


def progress_in_context(fields: dict[str, Any], state: JobState | Fold) -> dict[str, Any]:
    """A progress event's stored fields, checked and completed against the job's snapshot.

    ``current`` and ``total`` may come in separate events (``{"total": 7}`` then
    ``{"current": 3}``): ``current <= total`` holds for the values the snapshot will show,
    and a missing ``progress`` is derived from them, so every reader sees the same number.
    """
    if "current" not in fields and "total" not in fields:
        return fields
    current = fields.get("current", state.current)
    total = fields.get("total", state.total)
    if current is not None and total is not None and current > total:
        raise CountsOutOfRange(f"current {current} would exceed the job's total {total}")
    if "progress" not in fields and current is not None and total:
        return {"progress": 100 * current / total, **fields}
    return fields


def apply_event(
    state: JobState | None, event: dict[str, Any], generation_suffix: str = ""
) -> JobState:
    """The snapshot after ``event`` (a stored event, server fields included);
    ``generation_suffix`` ends a new job's epoch (``Generation.job_epoch_suffix``)."""
    event_type = event["type"]
    ts = event["ts"]
    if event_type == "created":
        return JobState(
            job_id=event["job_id"],
            kind=event.get("kind"),
            status="queued",
            last_seq=event["seq"],
            created_at=ts,
            updated_at=ts,
            metadata=event.get("metadata"),
            epoch=log_epoch(event["id"], ts, generation_suffix),
            heartbeat_timeout=event.get("heartbeat_timeout"),
        )
    if state is None:
        raise ValueError(f"event {event_type!r} before the job's created event")
    changes = event_changes(event)
    _add_derived(_so_far(state), changes, event)
    return _evolve(state, changes)


# What ``_add_derived`` reads of the state before an event: the fields of a ``JobState``, or
# of a ``Fold`` part-way through a group's events, as a plain dict (read once per event,
# many times: a dict lookup instead of an attribute through a descriptor).
_SO_FAR_FIELDS = (
    "status",
    "last_seq",
    "current",
    "total",
    "started_at",
    "updated_at",
    "progress",
    "window_advance",
    "window_seconds",
)


def _so_far(state: JobState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in _SO_FAR_FIELDS}


def _add_derived(state: dict[str, Any], changes: dict[str, Any], event: dict[str, Any]) -> None:
    """Add to ``changes`` the fields that depend on the state before ``event`` (``state``:
    its ``_SO_FAR_FIELDS``) as well as on the event: ``started_at`` and the rate window (see
    "Rate and ETA" below)."""
    ts = event["ts"]
    if state["started_at"] is None:
        changes["started_at"] = ts
    if event["type"] in TERMINAL_TYPES:
        if state["window_seconds"] is not None:
            changes.update(_NO_ESTIMATE)
    else:
        _sample(state, changes, ts)


def event_changes(event: dict[str, Any]) -> dict[str, Any]:
    """The fields a stored event other than ``created`` sets from its own content alone
    (the rest keep their values; ``_add_derived`` adds those that also depend on the state
    before it). ``Fold`` merges them in order, deriving each event's own from the state so
    far, which is applying the events one by one."""
    event_type = event["type"]
    ts = event["ts"]
    changes: dict[str, Any] = {"last_seq": event["seq"], "updated_at": ts}
    if event_type == "progress":
        changes["status"] = "running"
        changes.update({name: event[name] for name in _PROGRESS_FIELDS if name in event})
    elif event_type == "log":
        changes["status"] = "running"
    elif event_type in TERMINAL_TYPES:
        changes["status"] = event_type
        changes["finished_at"] = ts
        if event_type == "completed":
            changes["progress"] = 100.0
            changes["result"] = event.get("result")
            if "message" in event:
                changes["message"] = event["message"]
        elif event_type == "failed":
            changes["error"] = event["error"]
        elif "reason" in event:
            changes["message"] = event["reason"]
    return changes


T = TypeVar("T")


class _SoFar(Generic[T]):
    """A ``Fold`` attribute: the field's value with the changes folded so far."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, fold: Fold, owner: type | None = None) -> T:
        value: T = fold._so_far[self._name]
        return value


class Fold:
    """``apply_event`` over several events of one job, with the state built once at the end
    (``result``): the writer folds a group's appends to a job through one of these, and
    building a JobState per event was a tenth of a 100-event append's server CPU. While
    folding it answers what the planning asks of the state so far (``finished``,
    ``last_seq``, ``current``, ...)."""

    __slots__ = ("_changed", "_so_far", "_state")

    def __init__(self, state: JobState) -> None:
        self._state = state
        # The state's _SO_FAR_FIELDS with every change folded in, and the other fields the
        # events changed: what ``result`` lays over ``state``.
        self._so_far = _so_far(state)
        self._changed = False

    def apply(self, event: dict[str, Any]) -> None:
        """Fold in ``event``, a stored event other than ``created``."""
        changes = event_changes(event)
        _add_derived(self._so_far, changes, event)
        self._so_far.update(changes)
        self._changed = True

    def result(self) -> JobState:
        return _evolve(self._state, self._so_far) if self._changed else self._state

    @property
    def changed(self) -> bool:
        return self._changed

    def mark(self) -> tuple[dict[str, Any], bool]:
        """Where the fold is now, for ``restore``: a request refused part-way through its
        events leaves the fold as it was before the request."""
        return dict(self._so_far), self._changed

    def restore(self, mark: tuple[dict[str, Any], bool]) -> None:
        self._so_far, self._changed = mark

    # The state so far: what the state would be had the events folded in been applied.
    status: _SoFar[str] = _SoFar()
    last_seq: _SoFar[int] = _SoFar()
    current: _SoFar[int | None] = _SoFar()
    total: _SoFar[int | None] = _SoFar()

    @property
    def finished(self) -> bool:
        return self._so_far["status"] in TERMINAL_TYPES

    @property
    def kind(self) -> str | None:
        return self._state.kind  # set by the created event only


# -- Rate and ETA ---------------------------------------------------------------------------
#
# Every event of a running job after its first known position is a sample (ts, position).
# The position is ``current`` once the job has reported one, else ``progress`` (a percentage:
# jobs that report only fractions get an ETA too, but no ``rate``, which is in units of
# ``current``). Log and custom events are samples too: time passes without progress, so
# the rate decays and the ETA grows while a worker only reports that it is stuck.
#
# The window is two exponentially decayed sums, ``advance`` (position gained) and
# ``seconds`` (time passed): for each new sample, both are multiplied by
# RATE_WINDOW_SECONDS / (RATE_WINDOW_SECONDS + dt) before dt and the position's gain are
# added; rate = advance / seconds. So a steady job measures exactly its speed, and a
# changing one is weighed by age, the last ~RATE_WINDOW_SECONDS most (an interval's weight
# halves in about 20 s). Events of one commit share one ts (dt = 0): their gains add up
# without dividing by zero. No rate is given until the window holds MIN_RATE_SECONDS: two
# commits a millisecond apart would otherwise claim thousands of units a second. A
# position that goes down (a reset, a new phase counting from 0) or that changes unit
# (``current`` appears) starts a new window. Only + - * / on IEEE doubles and integer
# microseconds: the browser's fold (clients/js/jobfeed.js) gets the same bits.
RATE_WINDOW_SECONDS = 30.0
MIN_RATE_SECONDS = 1.0
# An ETA beyond this (about 32 years) is a stalled job, not an estimate: null. The bound also
# keeps a rate that has decayed to almost nothing from dividing into an overflow.
MAX_ETA_SECONDS = 1e9

_NO_ESTIMATE = {"window_advance": None, "window_seconds": None}


def _sample(state: dict[str, Any], changes: dict[str, Any], ts: str) -> None:
    """Add the window after a non-terminal event to ``changes``."""
    current = changes.get("current", state["current"])
    in_units = current is not None
    position = current if in_units else changes.get("progress", state["progress"])
    if position is None:
        return  # nothing to measure yet
    before = state["current"] if state["current"] is not None else state["progress"]
    if (
        state["window_seconds"] is None  # the first sample (or a snapshot stored before 0007)
        or before is None
        or (state["current"] is not None) != in_units
        or position < before
    ):
        advance = seconds = 0.0
    else:
        advance = state["window_advance"] or 0.0
        seconds = state["window_seconds"]
        elapsed = 0.0 if ts == state["updated_at"] else _seconds_between(state["updated_at"], ts)
        gain = position - before
        if elapsed or gain:
            decay = RATE_WINDOW_SECONDS / (RATE_WINDOW_SECONDS + elapsed)
            advance = advance * decay + gain
            seconds = seconds * decay + elapsed
    changes["window_advance"] = advance
    changes["window_seconds"] = seconds


def _seconds_between(earlier: str, later: str) -> float:
    """Seconds from one ts to a later one, computed from whole microseconds (never < 0)."""
    micros = _micros(later) - _micros(earlier)
    return micros / 1_000_000 if micros > 0 else 0.0


@lru_cache(maxsize=1024)
def _micros(ts: str) -> int:
    """Microseconds since 1970. Cached: a commit's events share one ts, and a job's previous
    ts is usually a recent commit's (parsing costs ~0.7 µs, the fold's hot path)."""
    return (datetime.fromisoformat(ts) - _UNIX_EPOCH) // _MICROSECOND


# Each field's slot setter: a frozen dataclass's fields are set through object's machinery.
_SETTERS = tuple((f.name, getattr(JobState, f.name).__set__) for f in fields(JobState))


def _evolve(state: JobState, changes: dict[str, Any]) -> JobState:
    """``dataclasses.replace(state, **changes)`` without its ``__init__`` round trip: 1.9 µs
    instead of 4.9 per event, and the writer runs this once per appended event."""
    evolved: JobState = object.__new__(JobState)
    for name, set_slot in _SETTERS:
        set_slot(evolved, changes[name] if name in changes else getattr(state, name))
    return evolved
