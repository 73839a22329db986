"""REST for producers and auditors: create, list, snapshot, append, events page, NDJSON export.

Thin: parse and validate at the edge, hand the work to the store, shape the answer. Stored
events and snapshots are already JSON; pages are built by joining those bytes, not by parsing
and re-serializing them. Responses that can be large (the events page, the NDJSON export, the
job list) are read in parts of at most ``stream.page_bytes`` and sent through
``handlers.sending``: bounded buffering and a send timeout, as streams have.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from ..auth import READ, WRITE, require
from ..errors import (
    EventTooLarge,
    Forbidden,
    InvalidJson,
    InvalidParameter,
    JobNotFound,
    ServiceError,
    ValidationFailed,
)
from ..keys import CONFIG, METRICS, STORE
from ..logs import bind_request
from ..models import (
    JOB_STATUSES,
    CreateJobIn,
    field_errors,
    is_batch,
    parse_append_body,
    stored_size_estimate,
)
from ..store import Store
from ..tenancy import JobKey
from .request import JSON_TYPE, json_response, parse_int, query_int, read_json
from .sending import send_bounded
from .subscription import check_offset

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_last_ulid = 0


def new_job_id() -> str:
    """A monotonic ULID: 48 bits of milliseconds then 80 random bits; within one millisecond
    the next id is the previous plus one, so ids sort by creation time."""
    global _last_ulid
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    if value <= _last_ulid:
        value = _last_ulid + 1
    _last_ulid = value
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


async def create_job(request: web.Request) -> web.Response:
    principal = require(request, WRITE)
    body = await read_json(request, allow_empty=True)
    if not isinstance(body, dict):
        raise InvalidJson("the body must be a JSON object")
    try:
        spec = CreateJobIn.model_validate(body)
    except ValidationError as exc:
        job_id = body.get("job_id")
        created = {"type": "created", "kind": body.get("kind"), "metadata": body.get("metadata")}
        # A server-made id is a 26-character ULID.
        job_id = job_id if isinstance(job_id, str) else "0" * 26
        _refuse_oversize(job_id, created, request.app[CONFIG].limits.max_event_bytes)
        raise ValidationFailed("the job is not valid", field_errors(exc)) from None
    job_id = spec.job_id or new_job_id()
    bind_request(job_id=job_id)
    if principal.grants is not None and not principal.grants.covers(job_id):
        # Refused, not "not found": a grant names which ids a credential may create, and
        # the refusal says nothing about whether the job exists.
        raise Forbidden(f"this credential's jobs grant does not cover job id {job_id}")
    key = JobKey(principal.tenant, job_id)
    timeout = spec.heartbeat_timeout
    if timeout is None and spec.kind is not None:
        timeout = request.app[CONFIG].watchdog.kinds.get(spec.kind)
    state = await request.app[STORE].writer.create_job(key, spec.kind, spec.metadata, timeout)
    response = json_response(state.to_json(), status=201)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return response


async def list_jobs(request: web.Request) -> web.StreamResponse:
    principal = require(request, READ)
    limits = request.app[CONFIG].limits
    status = request.query.get("status") or None
    if status is not None and status not in JOB_STATUSES:
        raise InvalidParameter(f"status must be one of {', '.join(JOB_STATUSES)}")
    kind = request.query.get("kind") or None
    prefix = parse_prefix(request)
    default = min(limits.jobs_page_default, limits.page_size_max)
    limit = query_int(request, "limit", default, minimum=1, maximum=limits.page_size_max)
    cursor_raw = request.query.get("cursor") or None
    before = None if cursor_raw is None else parse_int("cursor", cursor_raw, minimum=1)
    store = request.app[STORE]
    # One read, so that the snapshots and "cursor" (the feed position of this list, feed.md:
    # GET /v1/feed?after=<cursor> goes on from exactly the state they show) are of one moment;
    # it stops at stream.page_bytes of snapshots, and next_cursor goes on from there.
    snapshots, next_before, last_id = await store.list_jobs(
        principal.tenant,
        status,
        kind,
        limit,
        before,
        principal.grants,
        _page_bytes(request),
        prefix=prefix,
    )
    return await send_bounded(request, _json_stream(), _job_list(snapshots, next_before, last_id))


_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def parse_prefix(request: web.Request) -> str | None:
    """``prefix=``: jobs whose id starts with it (what can begin a job id, else 400)."""
    prefix = request.query.get("prefix") or None
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise InvalidParameter(f"prefix {prefix[:40]!r} cannot begin any job id")
    return prefix


async def _job_list(
    snapshots: list[bytes], next_before: int | None, last_id: int
) -> AsyncGenerator[bytes, None]:
    """The job list's body (``send_bounded`` writes it in pieces)."""
    cursor = None if next_before is None else str(next_before)
    yield b'{"jobs":[%s],"next_cursor":%s,"cursor":%d}\n' % (
        b",".join(snapshots),
        orjson.dumps(cursor),
        last_id,
    )


async def get_job(request: web.Request) -> web.StreamResponse:
    key = _job_key(request, READ)
    snapshot = await request.app[STORE].snapshot_json(key)
    if snapshot is None:
        raise JobNotFound(key.job_id)
    # Up to ~1.2 MiB (metadata, result, error): sent as the pages are.
    return await send_bounded(request, _json_stream(), _only(snapshot + b"\n"))


async def append_events(request: web.Request) -> web.Response:
    counts = request.app[METRICS].append_requests
    try:
        response = await _append_events(request)
    except ServiceError as exc:
        counts["refused" if exc.status < 500 else "failed"] += 1
        raise
    except Exception:  # a bug: answered 500 by the middleware
        counts["failed"] += 1
        raise
    counts["created" if response.status == 201 else "duplicate"] += 1
    return response


async def _append_events(request: web.Request) -> web.Response:
    key = _job_key(request, WRITE)
    job_id = key.job_id
    config = request.app[CONFIG]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidJson('the body must be one event object or {"events": [...]}')
    events, errors = parse_append_body(body, config.limits.max_batch_events)
    if errors:
        _refuse_oversize(job_id, body, config.limits.max_event_bytes)
        raise ValidationFailed("the events are not valid", errors)
    # From the queue to the answer: what a producer waits for beyond its own request.
    started = time.perf_counter()
    result = await request.app[STORE].writer.append(key, events)
    request.app[METRICS].append_ack_seconds.observe(time.perf_counter() - started)
    payload = {
        "job_id": result.job_id,
        "last_seq": result.last_seq,
        "events": [event.to_dict() for event in result.events],
    }
    return json_response(orjson.dumps(payload), status=200 if result.all_duplicates else 201)


async def read_events(request: web.Request) -> web.StreamResponse:
    key = _job_key(request, READ)
    job_id = key.job_id
    config = request.app[CONFIG]
    store = request.app[STORE]
    # Every parameter is read here, before the representation is chosen: the page and the
    # export refuse the same bad values (the export then ignores limit).
    after = query_int(request, "after", 0)
    limit = query_int(
        request,
        "limit",
        min(config.limits.page_size_default, config.limits.page_size_max),
        minimum=1,
        maximum=config.limits.page_size_max,
    )
    head = await store.job_head(key)
    if head is None:
        raise JobNotFound(job_id)
    check_offset(job_id, head, after, request.query.get("epoch") or None)
    if "application/x-ndjson" in request.headers.get("Accept", ""):
        return await _export_ndjson(request, key, after)
    pieces = _event_page(store, key, after, limit, head.last_seq, _page_bytes(request))
    return await send_bounded(request, _json_stream(), pieces)


async def _event_page(
    store: Store, key: JobKey, after: int, limit: int, head_seq: int, page_bytes: int
) -> AsyncGenerator[bytes, None]:
    """An events page's body, read and sent in parts of at most ``page_bytes`` (plus one
    event). ``last_seq`` is known only at the end, so it follows the events."""
    opening = b'{"events":['
    listed = 0
    last = 0
    while listed < limit:
        frames = await store.read_after(key, after, limit - listed, max_bytes=page_bytes)
        if not frames:
            break
        yield opening + (b"," if listed else b"") + b",".join(frame.json for frame in frames)
        opening = b""
        listed += len(frames)
        after = last = frames[-1].seq
    if opening:
        yield opening
    last_seq = max(head_seq, last)
    next_after = last if last and last < last_seq else None
    yield b'],"last_seq":%d,"next_after":%s}\n' % (last_seq, orjson.dumps(next_after))


async def _export_ndjson(request: web.Request, key: JobKey, after: int) -> web.StreamResponse:
    """The whole log from ``after``, one event per line, read and sent in parts."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    page_events = request.app[CONFIG].limits.page_size_max
    pieces = _ndjson_lines(request.app[STORE], key, after, page_events, _page_bytes(request))
    return await send_bounded(request, response, pieces)


async def _ndjson_lines(
    store: Store, key: JobKey, after: int, page_events: int, page_bytes: int
) -> AsyncGenerator[bytes, None]:
    # A short read does not prove the end (it may be cut by bytes): read until one is empty.
    while True:
        frames = await store.read_after(key, after, page_events, max_bytes=page_bytes)
        if not frames:
            break
        yield b"".join(frame.json + b"\n" for frame in frames)
        after = frames[-1].seq


async def _only(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


def _json_stream() -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": JSON_TYPE})


def _page_bytes(request: web.Request) -> int:
    return request.app[CONFIG].stream.page_bytes


def _refuse_oversize(job_id: str, body: dict[str, Any], limit: int) -> None:
    """Size before field rules: an event over ``limit`` is 413 even when it also breaks a
    field cap. Valid events are measured exactly by the writer; this runs only on refusal."""
    items = body["events"] if is_batch(body) and isinstance(body["events"], list) else [body]
    for index, item in enumerate(items):
        size = stored_size_estimate(job_id, item)
        if size > limit:
            raise EventTooLarge(
                f"event {index} is about {size} bytes serialized; "
                f"the limit is {limit} (limits.max_event_bytes)"
            )


def _job_key(request: web.Request, scope: str) -> JobKey:
    """The job the URL names, of the caller's tenant, if its credential holds ``scope`` and
    grants the job (``JobNotFound`` otherwise, as for a job that does not exist)."""
    job_id = request.match_info["job_id"]
    bind_request(job_id=job_id)
    return require(request, scope).job_key(job_id)
