"""REST for producers and auditors: create, list, snapshot, append, events page, NDJSON export.

Thin: parse and validate at the edge, hand the work to the store, shape the answer. Stored
events and snapshots are already JSON; pages are built by joining those bytes, not by parsing
and re-serializing them. Responses that can be large (the events page, the NDJSON export, the
job list) are read in parts of at most ``stream.page_bytes`` and sent through
``handlers.sending``: bounded buffering and a send timeout, as streams have.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator

import orjson
import structlog
from aiohttp import web

from ..appends import (
    append_ack,
    append_outcome,
    append_status,
    parse_append,
    parse_create,
)
from ..auth import ADMIN, READ, WRITE, require
from ..errors import InvalidParameter, JobNotFound
from ..keys import CONFIG, METRICS, STORE
from ..logs import bind_request
from ..models import JOB_STATUSES
from ..store import Store
from ..tenancy import JobKey
from .request import JSON_TYPE, json_response, parse_int, query_int, read_json
from .sending import send_bounded
from .subscription import check_offset

log = structlog.get_logger("jobfeed.jobs")


async def create_job(request: web.Request) -> web.Response:
    principal = require(request, WRITE)
    body = await read_json(request, allow_empty=True)
    config = request.app[CONFIG]
    job = parse_create(principal, body, config.limits, config.watchdog.kinds)
    bind_request(job_id=job.key.job_id)
    state = await request.app[STORE].writer.create_job(
        job.key, job.kind, job.metadata, job.heartbeat_timeout
    )
    response = json_response(state.to_json(), status=201)
    response.headers["Location"] = f"/v1/jobs/{job.key.job_id}"
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


async def delete_job(request: web.Request) -> web.Response:
    """``DELETE /v1/jobs/{job_id}`` (``jobs:admin``): the job, its log and its keys, in one
    transaction through the writer; 204, or 404 for a job that does not exist (or not in
    the caller's tenant and grants). Its open streams end with 4410 (server/deletion.py)."""
    key = _job_key(request, ADMIN)
    started = time.perf_counter()
    removed = await request.app[STORE].deleter.delete_job(key)
    log.info(
        "job_deleted",
        job_id=key.job_id,
        tenant=key.tenant,
        events=removed,
        reason="api",
        ms=round((time.perf_counter() - started) * 1000, 3),
    )
    return web.Response(status=204)


async def append_events(request: web.Request) -> web.Response:
    counts = request.app[METRICS].append_requests
    try:
        response = await _append_events(request)
    except Exception as exc:  # a ServiceError, or a bug: answered 500 by the middleware
        counts[append_outcome(exc)] += 1
        raise
    counts["created" if response.status == 201 else "duplicate"] += 1
    return response


async def _append_events(request: web.Request) -> web.Response:
    key = _job_key(request, WRITE)
    body = await read_json(request)
    events = parse_append(key.job_id, body, request.app[CONFIG].limits)
    # From the queue to the answer: what a producer waits for beyond its own request.
    started = time.perf_counter()
    result = await request.app[STORE].writer.append(key, events)
    request.app[METRICS].append_ack_seconds.observe(time.perf_counter() - started)
    return json_response(append_ack(result), status=append_status(result))


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


def _job_key(request: web.Request, scope: str) -> JobKey:
    """The job the URL names, of the caller's tenant, if its credential holds ``scope`` and
    grants the job (``JobNotFound`` otherwise, as for a job that does not exist)."""
    job_id = request.match_info["job_id"]
    bind_request(job_id=job_id)
    return require(request, scope).job_key(job_id)
