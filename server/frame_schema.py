"""The stream frames as a JSON Schema document, served at ``GET /v1/frames.schema.json``.

``/v1/openapi.json`` describes requests and answers; a stream's frames (WebSocket messages,
and the ``data:`` of Server-Sent Events records) are outside OpenAPI's model, so they are
described here: hello (job stream and feed), the stored events by type, heartbeat (job stream
and feed), snapshot (feed), pong and error.

One description: the stored events are derived from the very input models the server
validates appends with (``server.models``: the input's fields without ``key``, plus the
fields the server sets), so a field added to an event type appears here by itself. The
control frames are built by hand on the streaming paths (a dict and ``orjson``, a few per
subscription); their models below describe them without being put on those paths, and
tests/test_frame_schema.py holds them to the truth: every kind of frame a real server sends,
on both transports, must validate, and the Python client's types must name the same fields.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, get_args

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from .handlers.request import json_response
from .models import (
    JOB_ID_PATTERN,
    JOB_STATUSES,
    RESERVED_TYPES,
    CancelledIn,
    CompletedIn,
    CustomIn,
    FailedIn,
    JsonObject,
    LogIn,
    ProgressIn,
)

REF = "#/$defs/{model}"
Position = Annotated[int, Field(ge=0)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
Status = Literal["queued", "running", "completed", "failed", "cancelled"]
assert get_args(Status) == JOB_STATUSES


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- control frames ---------------------------------------------------------------------------


class JobHello(_Frame):
    """First frame of a job stream: where it starts and the job as it was then."""

    type: Literal["hello"]
    job_id: str
    status: Status
    after: Position
    last_seq: Position
    epoch: str | None


class FeedHello(_Frame):
    """First frame of a feed: ``after`` as asked (or "now"), ``last_id`` the log's end,
    ``epoch`` the log's identity (the database's generation; ``?epoch=`` when resuming)."""

    type: Literal["hello"]
    after: Position
    last_id: Position
    epoch: str


class JobHeartbeat(_Frame):
    """Sent when a job stream has been idle for ``stream.heartbeat_seconds`` (WebSocket; SSE
    sends a comment instead)."""

    type: Literal["heartbeat"]
    last_seq: Position


class FeedHeartbeat(_Frame):
    """Sent when a feed has been idle: ``last_id`` is the position scanned, to resume from."""

    type: Literal["heartbeat"]
    last_id: Position


class Pong(_Frame):
    """The answer to a client's ``{"type": "ping"}`` (WebSocket)."""

    type: Literal["pong"]


class ErrorFrame(_Frame):
    """Why the stream is refused or closing (before a 4xxx close), or a client frame was
    refused; SSE sends it as an ``event: error`` record."""

    type: Literal["error"]
    code: str
    message: str


class RateWindow(_Frame):
    """The rate estimator's state (docs/protocol.md, "Rate and ETA"): what a client that
    folds events onto a snapshot needs to go on computing the server's rate and ETA."""

    advance: Annotated[float, Field(ge=0)]
    seconds: Annotated[float, Field(ge=0)]


class Snapshot(_Frame):
    """A job's snapshot (``GET /v1/jobs/{id}``; ``server.snapshot.JobState.to_dict``): a
    fixed shape, null where there is no value."""

    job_id: str
    kind: str | None
    status: Status
    progress: Annotated[float, Field(ge=0, le=100)] | None
    phase: str | None
    message: str | None
    current: Annotated[int, Field(ge=0)] | None
    total: Annotated[int, Field(ge=0)] | None
    last_seq: Annotated[int, Field(ge=1)]
    created_at: Timestamp
    updated_at: Timestamp
    finished_at: Timestamp | None
    metadata: JsonObject | None
    result: Any
    error: JsonObject | None
    epoch: str | None
    started_at: Timestamp | None
    rate: Annotated[float, Field(ge=0)] | None
    eta_seconds: Annotated[float, Field(ge=0)] | None
    rate_window: RateWindow | None
    heartbeat_timeout: Annotated[float, Field(gt=0)] | None


class SnapshotFrame(_Frame):
    """A feed with ``snapshots=1`` sends one per matching unfinished job, after hello."""

    type: Literal["snapshot"]
    job: Snapshot


# -- stored events ----------------------------------------------------------------------------


class _Stored(_Frame):
    """What the server sets on every stored event."""

    job_id: Annotated[str, Field(pattern=JOB_ID_PATTERN)]
    seq: Annotated[int, Field(ge=1)]
    id: Annotated[int, Field(ge=1)]
    ts: Timestamp


class CreatedEvent(_Stored):
    """Seq 1 of every job, written by ``POST /v1/jobs``."""

    type: Literal["created"]
    kind: str | None = None
    metadata: JsonObject | None = None
    # Seconds without an event before the server fails the job (given, or the kind's).
    heartbeat_timeout: Annotated[float, Field(gt=0)] | None = None


def _stored(model: type[BaseModel], **server_fields: Any) -> type[BaseModel]:
    """The stored form of an input event model: its fields but ``key``, after the server's,
    and then ``server_fields`` (what only the server writes into that type of event)."""
    name = model.__name__.removesuffix("In") + "Event"
    fields: dict[str, Any] = {
        field_name: (field.annotation, field)
        for field_name, field in model.model_fields.items()
        if field_name != "key"
    }
    fields.update(server_fields)
    stored: type[BaseModel] = create_model(name, __base__=_Stored, __doc__=model.__doc__, **fields)
    return stored


# ``by``: "server" on a failed event the server appended itself (the worker-lost watchdog,
# error code worker_lost); absent on a producer's.
_BY_SERVER = (
    Literal["server"] | None,
    Field(None, description='"server": appended by the server itself (worker_lost)'),
)
STORED_EVENTS: tuple[type[BaseModel], ...] = (
    CreatedEvent,
    *(_stored(m) for m in (ProgressIn, LogIn, CompletedIn)),
    _stored(FailedIn, by=_BY_SERVER),
    *(_stored(m) for m in (CancelledIn, CustomIn)),
)
CONTROL_FRAMES: tuple[type[BaseModel], ...] = (
    JobHello,
    FeedHello,
    JobHeartbeat,
    FeedHeartbeat,
    Pong,
    ErrorFrame,
    SnapshotFrame,
)


@functools.cache
def build_frames_schema() -> dict[str, Any]:
    """The document: every model under ``$defs``, ``Event`` (one of the stored events),
    ``JobStreamFrame`` and ``FeedFrame`` (what each kind of stream may send), and the root:
    any frame."""
    _, document = models_json_schema(
        [(model, "validation") for model in (*STORED_EVENTS, *CONTROL_FRAMES)],
        ref_template=REF,
    )
    defs: dict[str, Any] = document["$defs"]
    # As in /v1/openapi.json: a custom type is not a reserved word, so exactly one of the
    # event schemas matches any event.
    custom_type = defs["CustomEvent"]["properties"]["type"]
    custom_type["not"] = {"enum": sorted(RESERVED_TYPES)}
    custom_type["description"] = "a custom event type; not a reserved word"

    def one_of(*names: str) -> dict[str, Any]:
        return {"oneOf": [{"$ref": REF.format(model=name)} for name in names]}

    for name in (*(model.__name__ for model in STORED_EVENTS), "ErrorInfo"):
        _absent_not_null(defs[name])
    defs["Event"] = one_of(*(model.__name__ for model in STORED_EVENTS))
    defs["Event"]["description"] = "A stored event, as the log holds it and streams send it."
    defs["JobStreamFrame"] = one_of("JobHello", "Event", "JobHeartbeat", "Pong", "ErrorFrame")
    defs["FeedFrame"] = one_of(
        "FeedHello", "Event", "FeedHeartbeat", "SnapshotFrame", "Pong", "ErrorFrame"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "/v1/frames.schema.json",
        "title": "jobfeed stream frames",
        "description": "What GET /v1/jobs/{job_id}/stream and GET /v1/feed send: WebSocket "
        "text frames, and the data of Server-Sent Events records. See docs/protocol.md.",
        "anyOf": [
            {"$ref": REF.format(model="JobStreamFrame")},
            {"$ref": REF.format(model="FeedFrame")},
        ],
        "$defs": defs,
    }


def _absent_not_null(schema: dict[str, Any]) -> None:
    """A stored event omits a field it does not have, and holds the default of one that has
    a default (``server.models._EventIn.stored_fields``): an input model's optional field
    (``X | None = None``) is, stored, an optional ``X``; a field with a default (a log's
    ``level``) is always there."""
    required: list[str] = schema.setdefault("required", [])
    for name, prop in schema["properties"].items():
        options = prop.get("anyOf")
        if options and {"type": "null"} in options:
            rest = [option for option in options if option != {"type": "null"}]
            del prop["anyOf"]
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest
        default = prop.pop("default", None)
        if default is not None and name not in required:
            required.append(name)


async def frames_schema_json(request: web.Request) -> web.Response:
    """``GET /v1/frames.schema.json``: built once per process (it depends on no config)."""
    return json_response(orjson.dumps(build_frames_schema()))
