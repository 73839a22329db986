"""The HTTP API as an OpenAPI 3.1 document, served at ``GET /v1/openapi.json``.

Request bodies come from the same pydantic models the handlers validate with
(``server.models``), so the document cannot drift from what the server accepts; response
shapes are written here, next to the protocol they describe (docs/protocol.md). Limits that
operators may change (``limits.max_batch_events``, ``limits.page_size_max``, body sizes) are
read from the running config.

The stream endpoint is listed for completeness only: WebSocket and Server-Sent Events are
outside OpenAPI's request/response model (tests exclude it from schemathesis).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from .config import Config
from .handlers.request import json_response
from .handlers.tickets import TicketIn
from .keys import CONFIG
from .models import (
    JOB_ID_PATTERN,
    JOB_STATUSES,
    RESERVED_TYPES,
    CancelledIn,
    CompletedIn,
    CreateJobIn,
    CustomIn,
    FailedIn,
    LogIn,
    ProgressIn,
)

REF = "#/components/schemas/{model}"
EVENT_MODELS: tuple[type[BaseModel], ...] = (
    ProgressIn,
    LogIn,
    CompletedIn,
    FailedIn,
    CancelledIn,
    CustomIn,
)
# Integer query parameters are plain decimal digits, at most 18 of them (handlers/request.py).
_MAX_QUERY_INT = 10**18 - 1
JSON = "application/json"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _model_schemas() -> dict[str, Schema]:
    """components/schemas for every input model (nested models, e.g. ErrorInfo, included)."""
    schemas: dict[str, Schema] = {}
    models: tuple[type[BaseModel], ...] = (*EVENT_MODELS, CreateJobIn, TicketIn)
    for model in models:
        schema = model.model_json_schema(ref_template=REF, mode="validation")
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = schema
    # The models check these in code; say them in the schema too, so that the event models
    # are disjoint (``oneOf`` holds) and generated examples are the ones the server takes.
    custom_type = schemas["CustomIn"]["properties"]["type"]
    custom_type["not"] = {"enum": sorted(RESERVED_TYPES)}
    custom_type["description"] = "a custom event type; not a reserved word"
    progress = schemas["ProgressIn"]
    fields = ("progress", "phase", "message", "current", "total", "data")
    progress["anyOf"] = [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in fields
    ]
    progress["description"] = (
        "At least one of progress, phase, message, current, total, data (not null); "
        "current <= total (else 422)."
    )
    return schemas


def _response_schemas() -> dict[str, Schema]:
    string_or_null = _nullable({"type": "string"})
    timestamp = {"type": "string", "format": "date-time"}
    snapshot: Schema = {
        "type": "object",
        "description": "A job's snapshot: a fixed shape, null where there is no value.",
        "properties": {
            "job_id": {"type": "string"},
            "kind": string_or_null,
            "status": {"enum": list(JOB_STATUSES)},
            "progress": _nullable({"type": "number", "minimum": 0, "maximum": 100}),
            "phase": string_or_null,
            "message": string_or_null,
            "current": _nullable({"type": "integer", "minimum": 0}),
            "total": _nullable({"type": "integer", "minimum": 0}),
            "last_seq": {"type": "integer", "minimum": 1},
            "created_at": timestamp,
            "updated_at": timestamp,
            "finished_at": _nullable(timestamp),
            "metadata": _nullable({"type": "object"}),
            "result": {"description": "the completed event's result (any JSON), else null"},
            "error": _nullable({"type": "object"}),
            "heartbeat_timeout": _nullable(
                {
                    "type": "number",
                    "description": "seconds without an event after which the server fails "
                    "the unfinished job as worker_lost (docs/operations.md); null: not watched",
                }
            ),
        },
    }
    # Rate and ETA (server.snapshot, docs/protocol.md "Rate and ETA"): null when unknown.
    snapshot["properties"].update(
        {
            "started_at": _nullable(timestamp),
            "rate": _nullable({"type": "number", "minimum": 0}),
            "eta_seconds": _nullable({"type": "number", "minimum": 0}),
            "rate_window": _nullable(
                {
                    "type": "object",
                    "description": "the estimator's state, for clients that fold events "
                    "onto this snapshot; opaque otherwise",
                    "properties": {
                        "advance": {"type": "number", "minimum": 0},
                        "seconds": {"type": "number", "minimum": 0},
                    },
                    "required": ["advance", "seconds"],
                    "additionalProperties": False,
                }
            ),
        }
    )
    snapshot["required"] = list(snapshot["properties"])
    # The log's identity: changes when a job_id's log is replaced (see server.snapshot).
    snapshot["properties"]["epoch"] = _nullable({"type": "string"})
    snapshot["additionalProperties"] = False
    return {
        "Snapshot": snapshot,
        "Event": {
            "type": "object",
            "description": "A stored event: server-set fields, then the event's own fields "
            "(absent ones omitted).",
            "properties": {
                "job_id": {"type": "string"},
                "seq": {"type": "integer", "minimum": 1},
                "id": {"type": "integer", "minimum": 1},
                "type": {"type": "string"},
                "ts": timestamp,
            },
            "required": ["job_id", "seq", "id", "type", "ts"],
        },
        "JobList": {
            "type": "object",
            "properties": {
                "jobs": {"type": "array", "items": _ref("Snapshot")},
                "next_cursor": string_or_null,
                "cursor": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the last event id committed when the list was read: "
                    "GET /v1/feed?after=<cursor> continues from exactly this list",
                },
            },
            "required": ["jobs", "next_cursor", "cursor"],
            "additionalProperties": False,
        },
        "AppendResult": {
            "type": "object",
            "properties": {
                "job_id": {"type": "string"},
                "last_seq": {"type": "integer", "minimum": 1},
                "events": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "seq": {"type": "integer", "minimum": 1},
                            "id": {"type": "integer", "minimum": 1},
                            "ts": timestamp,
                            "duplicate": {"const": True},
                        },
                        "required": ["seq", "id", "ts"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["job_id", "last_seq", "events"],
            "additionalProperties": False,
        },
        "EventsPage": {
            "type": "object",
            "properties": {
                "events": {"type": "array", "items": _ref("Event")},
                "last_seq": {"type": "integer", "minimum": 0},
                "next_after": _nullable({"type": "integer", "minimum": 1}),
            },
            "required": ["events", "last_seq", "next_after"],
            "additionalProperties": False,
        },
        "Error": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "details": {
                            "type": "array",
                            "description": "field errors, for 422; empty otherwise",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "loc": {
                                        "type": "array",
                                        "items": {"type": ["string", "integer"]},
                                    },
                                    "msg": {"type": "string"},
                                    "type": {"type": "string"},
                                },
                            },
                        },
                    },
                    "required": ["code", "message", "details"],
                    "additionalProperties": False,
                },
            },
            "required": ["error"],
            "additionalProperties": False,
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"type": "string"}},
            "required": ["status"],
        },
        "Ticket": {
            "type": "object",
            "description": "A read-only stream ticket, for ?ticket= on GET requests.",
            "properties": {"ticket": {"type": "string"}, "expires_at": timestamp},
            "required": ["ticket", "expires_at"],
            "additionalProperties": False,
        },
    }


_ERRORS = {
    400: "invalid_json (body), invalid_parameter (query) or bad_request",
    401: "unauthorized: the credential is missing, malformed, badly signed, expired, for "
    "another audience or issuer, or revoked (auth.mode = jwt); has WWW-Authenticate",
    403: "forbidden: the credential lacks the scope (auth.mode = jwt)",
    404: "job_not_found",
    405: "method_not_allowed: another method on this path (with an Allow header)",
    408: "body_timeout: the body did not arrive within limits.body_timeout",
    409: "job_exists or job_finished (POST); log_reset (GET with an epoch that does not fit)",
    413: "body_too_large (limits.max_body_bytes) or event_too_large (limits.max_event_bytes)",
    415: "unsupported_media_type: a body without Content-Type: application/json",
    422: "validation_error: JSON that breaks the schema; details lists the fields",
    429: "rate_limited (limits.rate_per_client; off by default); has Retry-After",
    503: "overloaded, storage_unavailable or shutting_down; has Retry-After; safe to retry",
}


def _error_responses(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/E{status}"} for status in statuses}


def _json(schema: Schema, description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _query(name: str, schema: Schema, description: str | None = None) -> dict[str, Any]:
    """An optional query parameter. An empty value (``?limit=``) counts as absent
    (docs/protocol.md), which is what ``allowEmptyValue`` says."""
    parameter: dict[str, Any] = {
        "name": name,
        "in": "query",
        "required": False,
        "allowEmptyValue": True,
        "schema": schema,
    }
    if description is not None:
        parameter["description"] = description
    return parameter


def _query_int(name: str, minimum: int, maximum: int, description: str) -> dict[str, Any]:
    return _query(name, {"type": "integer", "minimum": minimum, "maximum": maximum}, description)


def _feed_filters(max_values: int) -> list[dict[str, Any]]:
    """The feed's filters: job, kind and type repeatable (OR), prefix once; AND across."""

    def repeated(name: str, item: Schema, description: str) -> dict[str, Any]:
        schema = {"type": "array", "items": item, "maxItems": max_values}
        return {**_query(name, schema, description), "style": "form", "explode": True}

    return [
        repeated("job", {"type": "string", "pattern": JOB_ID_PATTERN}, "a job id"),
        _query(
            "prefix",
            {"type": "string", "pattern": r"^[A-Za-z0-9._:-]{1,128}$"},
            "job ids beginning with it",
        ),
        repeated("kind", {"type": "string", "minLength": 1, "maxLength": 200}, "a job kind"),
        repeated(
            "type", {"type": "string", "pattern": r"^[a-z][a-z0-9_.-]{0,63}$"}, "an event type"
        ),
    ]


_EPOCH = _query(
    "epoch",
    {"type": "string"},
    "the epoch from an earlier hello or snapshot: a log that is not that one, or is behind "
    "after, is 409 log_reset",
)


def build_openapi(config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server running with ``config``."""
    limits = config.limits
    job_id_param = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
    }
    common = (401, 403, 429, 503)
    schemas = {**_model_schemas(), **_response_schemas()}
    schemas["AppendBody"] = {
        "description": "One event, or a batch appended atomically and in order "
        "(keys unique within the batch).",
        "oneOf": [
            _ref("EventIn"),
            {
                "type": "object",
                "properties": {
                    "events": {
                        "type": "array",
                        "items": _ref("EventIn"),
                        "minItems": 1,
                        "maxItems": limits.max_batch_events,
                    }
                },
                "required": ["events"],
                "additionalProperties": False,
            },
        ],
    }
    schemas["EventIn"] = {"oneOf": [_ref(model.__name__) for model in EVENT_MODELS]}
    responses = {
        f"E{status}": _json(_ref("Error"), description, **_error_headers(status))
        for status, description in _ERRORS.items()
    }
    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": {
                "operationId": "createJob",
                "summary": "Create a job; its log starts with the created event (seq 1).",
                "requestBody": {
                    "required": False,
                    "description": "May be absent (a job with a server-made id).",
                    "content": {JSON: {"schema": _ref("CreateJobIn")}},
                },
                "responses": {
                    "201": _json(
                        _ref("Snapshot"),
                        "the new job's snapshot",
                        headers={"Location": {"schema": {"type": "string"}}},
                    ),
                    **_error_responses(400, 405, 408, 409, 413, 415, 422, *common),
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "List jobs, newest first.",
                "parameters": [
                    _query("status", {"enum": list(JOB_STATUSES)}),
                    _query("kind", {"type": "string"}),
                    _query("prefix", {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}),
                    _query_int(
                        "limit",
                        1,
                        limits.page_size_max,
                        f"jobs per page (default "
                        f"{min(limits.jobs_page_default, limits.page_size_max)})",
                    ),
                    _query(
                        "cursor",
                        {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"},
                        "next_cursor of the previous page",
                    ),
                ],
                "responses": {
                    "200": _json(_ref("JobList"), "a page of snapshots"),
                    **_error_responses(400, 405, *common),
                },
            },
        },
        "/v1/jobs/{job_id}": {
            "parameters": [job_id_param],
            "get": {
                "operationId": "getJob",
                "summary": "One job's snapshot.",
                "responses": {
                    "200": _json(_ref("Snapshot"), "the snapshot"),
                    **_error_responses(404, 405, *common),
                },
            },
            "delete": {
                "operationId": "deleteJob",
                "summary": "Delete the job, its log and its idempotency keys, in one "
                "transaction (scope jobs:admin).",
                "description": "Open streams of the job get an error frame job_deleted and "
                "close 4410 (SSE: event: error, then the end). Afterwards the id is 404 and "
                "may be created again, with a new epoch.",
                "responses": {
                    "204": {"description": "deleted"},
                    **_error_responses(404, 405, *common),
                },
            },
        },
        "/v1/jobs/{job_id}/events": {
            "parameters": [job_id_param],
            "post": {
                "operationId": "appendEvents",
                "summary": "Append one event, or a batch atomically and in order.",
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _ref("AppendBody")}},
                },
                "responses": {
                    "201": _json(_ref("AppendResult"), "appended"),
                    "200": _json(_ref("AppendResult"), "every event was a duplicate key"),
                    **_error_responses(400, 404, 405, 408, 409, 413, 415, 422, *common),
                },
            },
            "get": {
                "operationId": "readEvents",
                "summary": "A page of the log (or, with Accept: application/x-ndjson, "
                "the whole log from after, one event per line).",
                "parameters": [
                    _query_int("after", 0, _MAX_QUERY_INT, "the last seq the client has"),
                    _query_int(
                        "limit",
                        1,
                        limits.page_size_max,
                        f"events per page (default "
                        f"{min(limits.page_size_default, limits.page_size_max)}; "
                        "checked, then ignored, by the NDJSON export)",
                    ),
                    _EPOCH,
                ],
                "responses": {
                    "200": {
                        "description": "a page of events",
                        "content": {
                            JSON: {"schema": _ref("EventsPage")},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        },
                    },
                    **_error_responses(400, 404, 405, 409, *common),
                },
            },
        },
        "/v1/jobs/{job_id}/stream": {
            "parameters": [job_id_param],
            "get": {
                "operationId": "streamJob",
                "summary": "Live stream: WebSocket on an Upgrade request, Server-Sent Events "
                "on Accept: text/event-stream.",
                "description": "WebSocket and SSE are outside OpenAPI's request/response model; "
                "frames, close codes and the catch-up guarantee are in docs/protocol.md. "
                "Last-Event-ID, when present, is after (SSE).",
                "parameters": [
                    _query_int("after", 0, _MAX_QUERY_INT, "the last seq the client has"),
                    _EPOCH,
                ],
                "responses": {
                    "101": {"description": "WebSocket: hello, the log, then live events"},
                    "200": {
                        "description": "SSE: hello, the log, then live events (a retryable "
                        "refusal to an EventSource: one event: error record)",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "204": {
                        "description": "SSE: the job is finished and after (Last-Event-ID) "
                        "is at or past its terminal event: EventSource stops reconnecting"
                    },
                    **_error_responses(400, 404, 405, 409, *common),
                },
            },
        },
        "/v1/feed": {
            "get": {
                "operationId": "feed",
                "summary": "The events of many jobs on one cursor (the event id): WebSocket on "
                "an Upgrade request, Server-Sent Events on Accept: text/event-stream.",
                "description": "Outside OpenAPI's request/response model like the job stream; "
                "frames, filters and the cursor are in docs/protocol.md. after absent: from "
                "now; Last-Event-ID, when present, is after (SSE). Filters: job, kind and type "
                "repeatable (OR), prefix; different filters AND.",
                "parameters": [
                    _query_int("after", 0, _MAX_QUERY_INT, "the last event id the client has"),
                    *_feed_filters(config.stream.feed_max_filter_values),
                    _query(
                        "snapshots",
                        {"type": "integer", "enum": [0, 1]},
                        "1: start with "
                        "the snapshot of every unfinished matching job (without after)",
                    ),
                    _query(
                        "epoch",
                        {"type": "string"},
                        "the epoch from an earlier feed hello: another log (a restored or "
                        "replaced database), or one behind after, is 409 log_reset",
                    ),
                ],
                "responses": {
                    "101": {"description": "WebSocket: hello, the log, then live events"},
                    "200": {
                        "description": "SSE: hello, the log, then live events",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_error_responses(400, 405, 409, *common),
                },
            },
        },
        "/v1/ingest": {
            "get": {
                "operationId": "ingest",
                "summary": "The producer stream: a WebSocket on which append and create "
                "requests are pipelined, each answered (ack after its commit, or error) in "
                "the order sent.",
                "description": "Outside OpenAPI's request/response model like the streams; "
                "frames, flow control and close codes are in docs/protocol.md (Producer "
                "stream). Scope jobs:write. Without a WebSocket upgrade: 400.",
                "responses": {
                    "101": {
                        "description": "WebSocket: append / create frames in, ack / "
                        "error frames out"
                    },
                    **_error_responses(400, 405, *common),
                },
            },
        },
        "/v1/tickets": {
            "post": {
                "operationId": "createTicket",
                "summary": "A short-lived, read-only ticket for a browser's ?ticket= "
                "(never more than the asking token; docs/security.md).",
                "requestBody": {
                    "required": False,
                    "description": "May be absent (a ticket with the token's own grants).",
                    "content": {JSON: {"schema": _ref("TicketIn")}},
                },
                "responses": {
                    "201": _json(_ref("Ticket"), "the ticket"),
                    **_error_responses(400, 405, 408, 413, 415, 422, *common),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness (never throttled).",
                "security": [],
                "responses": {"200": _json(_ref("Health"), "the process answers")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: database open, migrations applied, writable.",
                "security": [],
                "responses": {
                    "200": _json(_ref("Health"), "ready"),
                    "503": _json(_ref("Health"), "not ready, with a reason"),
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "the OpenAPI 3.1 document"),
                    **_error_responses(429, 503),
                },
            }
        },
        "/v1/frames.schema.json": {
            "get": {
                "operationId": "frames_schema",
                "summary": "The stream frames (hello, events, heartbeat, snapshot, pong, "
                "error) as a JSON Schema 2020-12 document.",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "the JSON Schema document"),
                    **_error_responses(*common),
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jobfeed",
            "version": "1",
            "description": "A durable job-progress log that streams to late and reconnecting "
            "subscribers. The full contract is docs/protocol.md.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "ticket": {"type": "apiKey", "in": "query", "name": "ticket"},
            },
        },
        # With auth.mode = "none" no credential is needed (and any is ignored).
        "security": [{"bearer": []}, {"ticket": []}] if config.auth.mode == "jwt" else [],
    }


def _error_headers(status: int) -> dict[str, Any]:
    if status in (429, 503):
        return {"headers": {"Retry-After": {"schema": {"type": "string"}}}}
    if status == 405:
        return {"headers": {"Allow": {"schema": {"type": "string"}}}}
    if status == 401:
        return {"headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}
    return {}


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /v1/openapi.json``: built per request (rarely asked; a few milliseconds)."""
    return json_response(orjson.dumps(build_openapi(request.app[CONFIG])))
