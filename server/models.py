"""Wire models: what producers may send, validated at the edge.

Type policy (protocol-v1 leaves it to us; see docs/protocol.md):
- strict types: JSON ``false`` is never an integer, ``"3"`` is never a number;
- an integer field accepts an integral number (``885.0`` -> 885), as JSON Schema does;
- ``null`` for an optional field means "absent": it is omitted from the stored event;
- unknown fields are refused (422), so a typo never silently loses data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
CUSTOM_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
RESERVED_TYPES = frozenset(
    {
        "created",
        "progress",
        "log",
        "completed",
        "failed",
        "cancelled",
        "hello",
        "heartbeat",
        "ping",
        "pong",
        "error",
    }
)
TERMINAL_TYPES = frozenset({"completed", "failed", "cancelled"})
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")


def _integral(value: Any) -> Any:
    """Accept 885.0 as 885 (JSON Schema's integer); leave everything else to strict int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The bounds come before the validator: after it, pydantic's JSON Schema spells them ge/le,
# which JSON Schema (and so /v1/openapi.json) would ignore.
Count = Annotated[int, Field(ge=0, le=2**53), BeforeValidator(_integral)]
Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=65_536)]
JsonObject = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _EventIn(_Strict):
    key: Annotated[str, Field(min_length=1, max_length=200)] | None = None

    def stored_fields(self) -> dict[str, Any]:
        """The event's own fields as stored, in protocol order, absent ones omitted."""
        return {
            name: value for name, value in self if value is not None and name not in ("key", "type")
        }


class ProgressIn(_EventIn):
    type: Literal["progress"]
    progress: Percent | None = None
    phase: Text | None = None
    message: Text | None = None
    current: Count | None = None
    total: Count | None = None
    data: JsonObject | None = None

    @model_validator(mode="after")
    def _check(self) -> ProgressIn:
        if all(
            v is None
            for v in (self.progress, self.phase, self.message, self.current, self.total, self.data)
        ):
            raise ValueError(
                "a progress event needs at least one of progress, phase, message, "
                "current, total, data"
            )
        if self.current is not None and self.total is not None and self.current > self.total:
            raise ValueError("current must be <= total")
        return self

    def stored_fields(self) -> dict[str, Any]:
        fields = super().stored_fields()
        if self.progress is None and self.total and self.current is not None:
            # The protocol stores the derived value, so every reader sees the same number.
            fields = {"progress": 100 * self.current / self.total, **fields}
        return fields


class LogIn(_EventIn):
    type: Literal["log"]
    message: Text
    level: Literal["debug", "info", "warning", "error"] = "info"
    data: JsonObject | None = None


class CompletedIn(_EventIn):
    type: Literal["completed"]
    result: Any = None
    message: Text | None = None
    data: JsonObject | None = None


class ErrorInfo(_Strict):
    message: Text
    code: Annotated[str, Field(max_length=200)] | None = None
    details: Any = None


class FailedIn(_EventIn):
    type: Literal["failed"]
    error: ErrorInfo
    data: JsonObject | None = None

    def stored_fields(self) -> dict[str, Any]:
        fields = super().stored_fields()
        fields["error"] = self.error.model_dump(exclude_none=True)
        return fields


class CancelledIn(_EventIn):
    type: Literal["cancelled"]
    reason: Text | None = None
    data: JsonObject | None = None


class CustomIn(_EventIn):
    type: Annotated[str, Field(pattern=CUSTOM_TYPE_RE.pattern)]
    message: Text | None = None
    data: JsonObject | None = None


class CheckedEvent:
    """An event the fast path (``check_event``) accepted: its type, key and stored fields,
    exactly what its pydantic model would have given (tests/test_models.py holds the two to
    that over arbitrary input)."""

    __slots__ = ("fields", "key", "type")

    def __init__(self, type: str, key: str | None, fields: dict[str, Any]) -> None:
        self.type = type
        self.key = key
        self.fields = fields

    def stored_fields(self) -> dict[str, Any]:
        """As ``_EventIn.stored_fields`` (the same dict each time: callers do not change it)."""
        return self.fields

    def __repr__(self) -> str:
        return f"CheckedEvent({self.type!r}, key={self.key!r}, {self.fields!r})"


# What the writer appends: a model instance, or what the fast path made of the same input.
EventIn = ProgressIn | LogIn | CompletedIn | FailedIn | CancelledIn | CustomIn | CheckedEvent

_MODELS_BY_TYPE: dict[str, type[_EventIn]] = {
    "progress": ProgressIn,
    "log": LogIn,
    "completed": CompletedIn,
    "failed": FailedIn,
    "cancelled": CancelledIn,
}


# A job's heartbeat_timeout (the worker-lost watchdog, server/watchdog.py), in seconds: at
# least a tenth of a second (the sweep's resolution is ``watchdog.interval_seconds`` anyway),
# at most 30 days (a longer silence is not a heartbeat).
MIN_HEARTBEAT_TIMEOUT = 0.1
MAX_HEARTBEAT_TIMEOUT = 30 * 86_400.0
HeartbeatTimeout = Annotated[
    float, Field(ge=MIN_HEARTBEAT_TIMEOUT, le=MAX_HEARTBEAT_TIMEOUT, allow_inf_nan=False)
]


class CreateJobIn(_Strict):
    job_id: Annotated[str, Field(pattern=JOB_ID_PATTERN)] | None = None
    kind: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    metadata: JsonObject | None = None
    heartbeat_timeout: HeartbeatTimeout | None = None


FieldError = dict[str, Any]


def field_errors(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[FieldError]:
    return [
        {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


# -- the fast path -----------------------------------------------------------------------------
# Validating a small event with its pydantic model, then asking the model for its stored fields,
# cost ~10 µs: as much as the rest of an append's Python work. ``check_event`` makes the same
# decision with plain checks for the events producers send all the time, and says "don't know"
# (None) for anything else: a field it does not check itself (failed's error object), a value
# of another type than the usual one (an integral float for a count), or any invalid input. The
# models then decide, and give the field errors. So the fast path can only ever accept what a
# model accepts, with the same stored fields in the same order (tests/test_models.py checks
# both over arbitrary input, hypothesis-generated).

_TEXT_MAX = 65_536
_KEY_MAX = 200
_COUNT_MAX = 2**53
_LEVELS = frozenset({"debug", "info", "warning", "error"})
# Each type's fields in the model's order (the stored order), without type and key.
_PROGRESS_FIELDS = ("progress", "phase", "message", "current", "total", "data")
_FAST_FIELDS: dict[str, tuple[str, ...]] = {
    "progress": _PROGRESS_FIELDS,
    "log": ("message", "level", "data"),
    "completed": ("result", "message", "data"),
    "cancelled": ("reason", "data"),
}
_CUSTOM_FIELDS = ("message", "data")
_UNCHECKED = object()  # "don't know": let the model decide


def _text(value: Any) -> Any:
    return value if type(value) is str and len(value) <= _TEXT_MAX else _UNCHECKED


def _count(value: Any) -> Any:
    return value if type(value) is int and 0 <= value <= _COUNT_MAX else _UNCHECKED


def _percent(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value if 0 <= value <= 100 else _UNCHECKED  # NaN fails both comparisons
    if kind is int and 0 <= value <= 100:
        return float(value)  # as pydantic's float does
    return _UNCHECKED


def _object(value: Any) -> Any:
    if type(value) is dict and all(type(name) is str for name in value):
        return dict(value)  # pydantic's dict[str, Any] is a new dict with the same values
    return _UNCHECKED


def _level(value: Any) -> Any:
    return value if type(value) is str and value in _LEVELS else _UNCHECKED


def _anything(value: Any) -> Any:
    return value


_FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "progress": _percent,
    "phase": _text,
    "message": _text,
    "current": _count,
    "total": _count,
    "data": _object,
    "level": _level,
    "result": _anything,
    "reason": _text,
}


def check_event(obj: dict[str, Any]) -> CheckedEvent | None:
    """``obj`` (a dict) as the model for its type would store it, or None when the fast
    path does not know (the model decides: it may accept, or give the field errors)."""
    event_type = obj.get("type")
    if type(event_type) is not str:
        return None
    names = _FAST_FIELDS.get(event_type)
    if names is None:
        # fullmatch: the pattern's ``$`` would also match before a trailing newline.
        if event_type in RESERVED_TYPES or not CUSTOM_TYPE_RE.fullmatch(event_type):
            return None  # failed, another reserved type, or a malformed one
        names = _CUSTOM_FIELDS
    key = obj.get("key")
    if key is not None and not (type(key) is str and 1 <= len(key) <= _KEY_MAX):
        return None
    fields: dict[str, Any] = {}
    known = 1 + ("key" in obj)
    for name in names:
        if name not in obj:
            continue
        known += 1
        value = obj[name]
        if value is None:
            continue  # null means absent
        checked = _FIELD_CHECKS[name](value)
        if checked is _UNCHECKED:
            return None
        fields[name] = checked
    if known != len(obj):
        return None  # an unknown field: the model refuses it
    if event_type == "progress":
        return _checked_progress(key, fields)
    if event_type == "log":
        if "message" not in fields or ("level" in obj and obj["level"] is None):
            return None  # both are required (level has a default, but null is not it)
        if "level" not in fields:  # the model's default, stored
            fields = {"message": fields["message"], "level": "info", **fields}
    return CheckedEvent(event_type, key, fields)


def _checked_progress(key: str | None, fields: dict[str, Any]) -> CheckedEvent | None:
    """ProgressIn's own rules (``_check``) and its derived progress (``stored_fields``)."""
    if not fields:
        return None
    current, total = fields.get("current"), fields.get("total")
    if current is not None and total is not None and current > total:
        return None
    if "progress" not in fields and total and current is not None:
        fields = {"progress": 100 * current / total, **fields}
    return CheckedEvent("progress", key, fields)


def parse_event(obj: Any, loc: tuple[str | int, ...]) -> EventIn | list[FieldError]:
    """Validate one event object; return the model or the field errors under ``loc``."""
    if not isinstance(obj, dict):
        return [{"loc": list(loc), "msg": "an event must be a JSON object", "type": "dict_type"}]
    event_type = obj.get("type")
    if not isinstance(event_type, str):
        return [{"loc": [*loc, "type"], "msg": "type must be a string", "type": "missing"}]
    model = _MODELS_BY_TYPE.get(event_type)
    if model is None:
        if event_type in RESERVED_TYPES:
            msg = f"{event_type!r} is reserved and cannot be appended"
            return [{"loc": [*loc, "type"], "msg": msg, "type": "reserved_type"}]
        if not CUSTOM_TYPE_RE.match(event_type):
            msg = f"type must match {CUSTOM_TYPE_RE.pattern} (or be a built-in type)"
            return [{"loc": [*loc, "type"], "msg": msg, "type": "string_pattern_mismatch"}]
        model = CustomIn
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        return field_errors(exc, loc)


# The shape of a stored ``ts`` (server.writer.utc_now): its length is all that counts here.
_TS_SHAPE = "2026-01-01T00:00:00.000000Z"


def stored_size_estimate(job_id: str, item: Any) -> int:
    """About how many bytes ``item``, an event as sent, would take stored: its fields without
    ``key`` and nulls, with the server's fields (seq and id at their shortest). For events
    that failed validation, whose stored form does not exist: size is checked before field
    rules, so that no field cap turns an event over ``limits.max_event_bytes`` into a 422."""
    if not isinstance(item, dict):
        item = {"event": item}
    fields = {name: value for name, value in item.items() if name != "key" and value is not None}
    try:
        return len(orjson.dumps({"job_id": job_id, "seq": 1, "id": 1, "ts": _TS_SHAPE, **fields}))
    except orjson.JSONEncodeError:  # too deep to store at all: the field errors say so
        return 0


def is_batch(obj: Any) -> bool:
    """``{"events": [...]}`` rather than one event."""
    return isinstance(obj, dict) and "events" in obj and "type" not in obj


def parse_append_body(
    obj: Any, max_events: int, *, fast: bool = True
) -> tuple[list[EventIn], list[FieldError]]:
    """One event, or ``{"events": [...]}``: the events, or the field errors (keys unique
    within the batch). ``fast``: try ``check_event`` before the models (False: the models
    alone, the reference the fast path is tested against)."""
    if is_batch(obj):
        if set(obj) != {"events"}:
            extra = sorted(set(obj) - {"events"})
            return [], [{"loc": [extra[0]], "msg": "unexpected field in a batch", "type": "extra"}]
        items = obj["events"]
        if not isinstance(items, list):
            return [], [{"loc": ["events"], "msg": "events must be an array", "type": "list_type"}]
        if not items:
            msg = "a batch needs at least one event"
            return [], [{"loc": ["events"], "msg": msg, "type": "too_short"}]
        if len(items) > max_events:
            msg = f"a batch holds at most {max_events} events"
            return [], [{"loc": ["events"], "msg": msg, "type": "too_long"}]
        prefix: tuple[str | int, ...] = ("events",)
    else:
        items, prefix = [obj], ()
    events: list[EventIn] = []
    errors: list[FieldError] = []
    seen_keys: set[str] = set()
    for index, item in enumerate(items):
        loc: tuple[str | int, ...] = (*prefix, index) if prefix else ()
        parsed: EventIn | list[FieldError] | None = None
        if fast and type(item) is dict:
            parsed = check_event(item)
        if parsed is None:
            parsed = parse_event(item, loc)
        if isinstance(parsed, list):
            errors.extend(parsed)
            continue
        if parsed.key is not None:
            if parsed.key in seen_keys:
                msg = "the same key appears twice in one batch"
                errors.append({"loc": [*loc, "key"], "msg": msg, "type": "duplicate_key"})
            seen_keys.add(parsed.key)
        events.append(parsed)
    return (events, []) if not errors else ([], errors)
