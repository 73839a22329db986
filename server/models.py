"""Wire models: what producers may send, validated at the edge.

Type policy (protocol-v1 leaves it to us; see docs/protocol.md):
- strict types: JSON ``false`` is never an integer, ``"3"`` is never a number;
- an integer field accepts an integral number (``885.0`` -> 885), as JSON Schema does;
- ``null`` for an optional field means "absent": it is omitted from the stored event;
- unknown fields are refused (422), so a typo never silently loses data.
"""

from __future__ import annotations

import re
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


EventIn = ProgressIn | LogIn | CompletedIn | FailedIn | CancelledIn | CustomIn

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


def parse_append_body(obj: Any, max_events: int) -> tuple[list[EventIn], list[FieldError]]:
    """One event, or ``{"events": [...]}``: the events, or the field errors (keys unique
    within the batch)."""
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
