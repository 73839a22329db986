"""The REST API through the real app (real socket, real SQLite in tmp_path), against protocol v1.

Covers every endpoint of the HTTP table and every error code it answers with; the malformed
and out-of-range bodies live in ``test_bad_input.py``. Every error body is checked by one
helper, ``assert_error``, so the protocol's single error shape is pinned everywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from server.models import JOB_ID_PATTERN
from tests.conftest import ClientFactory, ConfigFactory, append, create_job

Client = TestClient[Any, Any]

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SNAPSHOT_FIELDS = {
    "job_id",
    "kind",
    "status",
    "progress",
    "phase",
    "message",
    "current",
    "total",
    "last_seq",
    "created_at",
    "updated_at",
    "finished_at",
    "metadata",
    "result",
    "error",
    "epoch",
    "started_at",
    "rate",
    "eta_seconds",
    "rate_window",
    "heartbeat_timeout",
}


# -- helpers shared with test_bad_input.py ---------------------------------------------------


async def assert_error(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """Assert ``response`` is the protocol's error body with ``status`` and ``code``.

    The shape is exactly ``{"error": {"code": str, "message": str, "details": list}}``; a 422
    lists field errors, each with a ``loc`` list and a ``msg``. Returns the inner object.
    """
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", response.headers
    body = json.loads(text)
    assert isinstance(body, dict)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["details"], list)
    assert error["code"] == code, error
    if status == 422:
        assert error["details"], error
        for detail in error["details"]:
            assert isinstance(detail["loc"], list), detail
            assert isinstance(detail["msg"], str), detail
    result: dict[str, Any] = error
    return result


async def read_log(client: Client, job_id: str, after: int = 0) -> list[dict[str, Any]]:
    """The job's whole log after ``after``, walking the audit pages."""
    events: list[dict[str, Any]] = []
    next_after: int | None = after
    while next_after is not None:
        response = await client.get(f"/v1/jobs/{job_id}/events", params={"after": next_after})
        assert response.status == 200, await response.text()
        page = await response.json()
        events.extend(page["events"])
        next_after = page["next_after"]
    return events


async def log_end(client: Client, job_id: str) -> int:
    """The job's ``last_seq``, checked to agree between the snapshot and the stored log."""
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status == 200, await response.text()
    snapshot = await response.json()
    events = await read_log(client, job_id)
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert snapshot["last_seq"] == len(events)
    last_seq: int = snapshot["last_seq"]
    return last_seq


async def get_snapshot(client: Client, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status == 200, await response.text()
    snapshot: dict[str, Any] = await response.json()
    return snapshot


async def post_events(client: Client, job_id: str, body: Any) -> ClientResponse:
    return await client.post(f"/v1/jobs/{job_id}/events", json=body)


async def list_jobs(client: Client, **params: str | int) -> dict[str, Any]:
    response = await client.get("/v1/jobs", params=params)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


# -- POST /v1/jobs -----------------------------------------------------------------------------


async def test_create_returns_queued_snapshot(client: Client) -> None:
    """POST /v1/jobs answers 201 with the full, fixed-shape snapshot of a queued job."""
    response = await client.post("/v1/jobs", json={"job_id": "build-42"})
    assert response.status == 201
    snapshot = await response.json()
    assert set(snapshot) == SNAPSHOT_FIELDS
    assert snapshot["job_id"] == "build-42"
    assert snapshot["status"] == "queued"
    assert snapshot["last_seq"] == 1
    assert TS_RE.match(snapshot["created_at"])
    assert snapshot["updated_at"] == snapshot["created_at"]
    for name in ("progress", "phase", "message", "current", "total", "finished_at"):
        assert snapshot[name] is None, name
    for name in ("started_at", "rate", "eta_seconds", "rate_window"):
        assert snapshot[name] is None, name
    assert snapshot["result"] is None
    assert snapshot["error"] is None


async def test_create_sets_location_header(client: Client) -> None:
    """The 201 of a job creation carries ``Location: /v1/jobs/{job_id}``."""
    response = await client.post("/v1/jobs", json={"job_id": "located"})
    assert response.status == 201
    assert response.headers["Location"] == "/v1/jobs/located"


async def test_create_location_header_for_server_made_id(client: Client) -> None:
    """A job created without a job_id gets a Location naming its server-made id."""
    response = await client.post("/v1/jobs", json={})
    assert response.status == 201
    snapshot = await response.json()
    assert response.headers["Location"] == f"/v1/jobs/{snapshot['job_id']}"


async def test_create_appends_created_event_as_seq_1(client: Client) -> None:
    """Event 1 of a new job is its ``created`` event, carrying kind and metadata."""
    await create_job(client, job_id="first", kind="rc_analysis", metadata={"team_id": 12345})
    (event,) = await read_log(client, "first")
    assert event["seq"] == 1
    assert event["type"] == "created"
    assert event["job_id"] == "first"
    assert event["kind"] == "rc_analysis"
    assert event["metadata"] == {"team_id": 12345}
    assert isinstance(event["id"], int)
    assert TS_RE.match(event["ts"])


async def test_create_stores_kind_and_metadata(client: Client) -> None:
    """kind and metadata given at creation are in the snapshot, as sent."""
    metadata = {"team_id": 12345, "tags": ["a", "b"], "nested": {"x": None}}
    snapshot = await create_job(client, job_id="meta", kind="rc_analysis", metadata=metadata)
    assert snapshot["kind"] == "rc_analysis"
    assert snapshot["metadata"] == metadata
    assert (await get_snapshot(client, "meta"))["metadata"] == metadata


async def test_create_without_job_id_makes_valid_id(client: Client) -> None:
    """A job created without a job_id gets a server-made id matching the job_id pattern."""
    snapshot = await create_job(client)
    assert re.match(JOB_ID_PATTERN, snapshot["job_id"])
    assert (await get_snapshot(client, snapshot["job_id"]))["status"] == "queued"


async def test_server_made_ids_sort_by_creation_order(client: Client) -> None:
    """Server-made ids of jobs created one after another sort in creation order."""
    ids = [(await create_job(client))["job_id"] for _ in range(10)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 10


async def _created_event_ids(client: Client, job_ids: list[str]) -> dict[str, int]:
    """Each job's creation position in the server-wide log: its ``created`` event's id."""
    return {job_id: (await read_log(client, job_id))[0]["id"] for job_id in job_ids}


async def test_server_made_ids_sort_by_creation_when_created_concurrently(
    client: Client,
) -> None:
    """Server-made ids sort in creation order even for jobs created in the same millisecond
    (creation order: the ids of their ``created`` events in the server-wide log)."""
    snapshots = await asyncio.gather(*(create_job(client) for _ in range(30)))
    event_ids = await _created_event_ids(client, [s["job_id"] for s in snapshots])
    by_creation = sorted(event_ids, key=event_ids.__getitem__)
    assert sorted(by_creation) == by_creation


async def test_create_existing_job_id_is_409(client: Client) -> None:
    """Creating a job whose id exists answers 409 job_exists and leaves its log alone."""
    await create_job(client, job_id="twice", kind="first")
    response = await client.post("/v1/jobs", json={"job_id": "twice", "kind": "second"})
    await assert_error(response, 409, "job_exists")
    assert (await get_snapshot(client, "twice"))["kind"] == "first"
    assert await log_end(client, "twice") == 1


@pytest.mark.parametrize(
    "job_id",
    ["-leading-dash", ".dot", "has space", "slash/inside", "x" * 129, "", "ünïcode", "a\nb"],
)
async def test_create_invalid_job_id_is_422(client: Client, job_id: str) -> None:
    """A job_id outside ``^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$`` is refused with 422."""
    response = await client.post("/v1/jobs", json={"job_id": job_id})
    error = await assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"] == ["job_id"]
    assert (await list_jobs(client))["jobs"] == []


@pytest.mark.parametrize("job_id", ["a", "Z9", "build-42", "ns:job.v1_x-y", "x" * 128])
async def test_create_accepts_valid_job_ids(client: Client, job_id: str) -> None:
    """Every job_id matching the protocol's pattern is accepted, up to 128 characters."""
    snapshot = await create_job(client, job_id=job_id)
    assert snapshot["job_id"] == job_id
    assert (await get_snapshot(client, job_id))["job_id"] == job_id


async def test_create_with_no_body(client: Client) -> None:
    """POST /v1/jobs with no body at all creates a job with a server-made id."""
    response = await client.post("/v1/jobs")
    assert response.status == 201, await response.text()
    assert re.match(JOB_ID_PATTERN, (await response.json())["job_id"])


async def test_create_with_empty_json_body(client: Client) -> None:
    """An empty body sent as application/json is taken as ``{}``."""
    response = await client.post("/v1/jobs", data=b"", headers={"Content-Type": "application/json"})
    assert response.status == 201, await response.text()
    assert (await response.json())["status"] == "queued"


async def test_create_with_null_job_id_makes_one(client: Client) -> None:
    """``"job_id": null`` means absent: the server makes the id."""
    snapshot = await create_job(client, job_id=None, kind="k")
    assert re.match(JOB_ID_PATTERN, snapshot["job_id"])
    assert snapshot["kind"] == "k"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"job_id": "j", "owner": "me"}, ["owner"]),
        ({"job_id": 42}, ["job_id"]),
        ({"kind": ""}, ["kind"]),
        ({"kind": 7}, ["kind"]),
        ({"metadata": [1, 2]}, ["metadata"]),
        ({"metadata": "x"}, ["metadata"]),
    ],
)
async def test_create_invalid_fields_are_422(
    client: Client, body: dict[str, Any], loc: list[Any]
) -> None:
    """Unknown fields and wrongly typed kind/metadata/job_id are refused with 422 and a loc."""
    response = await client.post("/v1/jobs", json=body)
    error = await assert_error(response, 422, "validation_error")
    assert loc in [detail["loc"] for detail in error["details"]]
    assert (await list_jobs(client))["jobs"] == []


# -- GET /v1/jobs ------------------------------------------------------------------------------


async def test_list_jobs_empty(client: Client) -> None:
    """With no jobs the listing is ``{"jobs": [], "next_cursor": null, "cursor": 0}``."""
    assert await list_jobs(client) == {"jobs": [], "next_cursor": None, "cursor": 0}


async def test_list_jobs_newest_first(client: Client) -> None:
    """GET /v1/jobs lists snapshots, the most recently created first."""
    for name in ("one", "two", "three"):
        await create_job(client, job_id=name)
    body = await list_jobs(client)
    assert [job["job_id"] for job in body["jobs"]] == ["three", "two", "one"]
    assert body["next_cursor"] is None
    assert all(set(job) == SNAPSHOT_FIELDS for job in body["jobs"])


async def test_list_jobs_newest_first_when_created_concurrently(client: Client) -> None:
    """Jobs created at once (committed together) are listed in reverse creation order: the
    reverse of their ``created`` events' order in the server-wide log."""
    job_ids = [f"c-{index:02}" for index in range(30)]
    await asyncio.gather(*(create_job(client, job_id=job_id) for job_id in job_ids))
    event_ids = await _created_event_ids(client, job_ids)
    listed = [job["job_id"] for job in (await list_jobs(client, limit=30))["jobs"]]
    assert listed == sorted(job_ids, key=event_ids.__getitem__, reverse=True)


async def test_list_jobs_order_ignores_updates(client: Client) -> None:
    """Appending to an older job does not move it up: the order is by creation."""
    await create_job(client, job_id="old")
    await create_job(client, job_id="new")
    await append(client, "old", {"type": "log", "message": "still here"})
    assert [job["job_id"] for job in (await list_jobs(client))["jobs"]] == ["new", "old"]


async def _jobs_in_every_status(client: Client) -> None:
    await create_job(client, job_id="q", kind="a")
    await create_job(client, job_id="r", kind="b")
    await append(client, "r", {"type": "progress", "progress": 5})
    await create_job(client, job_id="c", kind="a")
    await append(client, "c", {"type": "completed"})
    await create_job(client, job_id="f", kind="b")
    await append(client, "f", {"type": "failed", "error": {"message": "boom"}})
    await create_job(client, job_id="x", kind="a")
    await append(client, "x", {"type": "cancelled"})


@pytest.mark.parametrize(
    ("status", "expected"),
    [("queued", ["q"]), ("running", ["r"]), ("completed", ["c"]), ("failed", ["f"]),
     ("cancelled", ["x"])],
)  # fmt: skip
async def test_list_jobs_filters_by_status(
    client: Client, status: str, expected: list[str]
) -> None:
    """``status=`` lists only the jobs whose current status is that one."""
    await _jobs_in_every_status(client)
    body = await list_jobs(client, status=status)
    assert [job["job_id"] for job in body["jobs"]] == expected
    assert all(job["status"] == status for job in body["jobs"])


async def test_list_jobs_filters_by_kind(client: Client) -> None:
    """``kind=`` lists only the jobs of that kind, newest first."""
    await _jobs_in_every_status(client)
    body = await list_jobs(client, kind="a")
    assert [job["job_id"] for job in body["jobs"]] == ["x", "c", "q"]
    assert (await list_jobs(client, kind="zzz"))["jobs"] == []


async def test_list_jobs_filters_combine(client: Client) -> None:
    """``status=`` and ``kind=`` together list the jobs matching both."""
    await _jobs_in_every_status(client)
    body = await list_jobs(client, kind="b", status="failed")
    assert [job["job_id"] for job in body["jobs"]] == ["f"]


async def test_list_jobs_limit_gives_a_cursor(client: Client) -> None:
    """``limit=`` caps the page; a further page is announced by a string next_cursor."""
    for index in range(5):
        await create_job(client, job_id=f"job-{index}")
    body = await list_jobs(client, limit=2)
    assert [job["job_id"] for job in body["jobs"]] == ["job-4", "job-3"]
    assert isinstance(body["next_cursor"], str)


async def test_list_jobs_cursor_walks_every_job_once(client: Client) -> None:
    """Following next_cursor visits every job exactly once, newest first, then ends with null."""
    created = [(await create_job(client, job_id=f"walk-{i:02}"))["job_id"] for i in range(11)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        body = await list_jobs(client, **params)
        seen.extend(job["job_id"] for job in body["jobs"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))
    assert pages == 4


async def test_list_jobs_cursor_with_filter(client: Client) -> None:
    """A cursor walk under a kind filter visits exactly the matching jobs."""
    for index in range(9):
        await create_job(client, job_id=f"k-{index}", kind="even" if index % 2 == 0 else "odd")
    seen: list[str] = []
    body = await list_jobs(client, kind="even", limit=2)
    seen.extend(job["job_id"] for job in body["jobs"])
    while body["next_cursor"] is not None:
        body = await list_jobs(client, kind="even", limit=2, cursor=body["next_cursor"])
        seen.extend(job["job_id"] for job in body["jobs"])
    assert seen == ["k-8", "k-6", "k-4", "k-2", "k-0"]


async def test_list_jobs_exact_last_page_has_null_cursor(client: Client) -> None:
    """When the jobs fill the page exactly, next_cursor is null (no empty extra page)."""
    for index in range(3):
        await create_job(client, job_id=f"exact-{index}")
    body = await list_jobs(client, limit=3)
    assert len(body["jobs"]) == 3
    assert body["next_cursor"] is None


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "status=RUNNING",
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=1001",
        "cursor=abc",
        "cursor=0",
        "cursor=-3",
        "cursor=1%0A",
        "limit=1%0A",
        "limit=%D9%A3",
    ],
)
async def test_list_jobs_bad_parameter_is_400(client: Client, query: str) -> None:
    """A bad status, limit (0, negative, not an integer, over page_size_max) or cursor is
    400 invalid_parameter."""
    await create_job(client, job_id="there")
    response = await client.get(f"/v1/jobs?{query}")
    await assert_error(response, 400, "invalid_parameter")


async def test_list_jobs_limit_up_to_page_size_max(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """``limit`` equal to limits.page_size_max is allowed; one more is 400."""
    client = await make_client(make_config(limits__page_size_max=4))
    for index in range(6):
        await create_job(client, job_id=f"p-{index}")
    assert len((await list_jobs(client, limit=4))["jobs"]) == 4
    await assert_error(await client.get("/v1/jobs?limit=5"), 400, "invalid_parameter")


# -- GET /v1/jobs/{job_id} ---------------------------------------------------------------------


async def test_get_job_returns_snapshot(client: Client) -> None:
    """GET /v1/jobs/{id} answers 200 with the same snapshot the creation returned."""
    created = await create_job(client, job_id="get-me", kind="k", metadata={"a": 1})
    assert await get_snapshot(client, "get-me") == created


async def test_get_unknown_job_is_404(client: Client) -> None:
    """GET of a job that does not exist is 404 job_not_found."""
    await assert_error(await client.get("/v1/jobs/missing"), 404, "job_not_found")


# -- POST /v1/jobs/{job_id}/events: shape ------------------------------------------------------


async def test_append_single_answers_201_with_positions(client: Client) -> None:
    """One event answers 201 ``{"job_id", "last_seq", "events": [{"seq", "id", "ts"}]}``."""
    await create_job(client, job_id="single")
    response = await post_events(client, "single", {"type": "log", "message": "hi"})
    assert response.status == 201
    body = await response.json()
    assert set(body) == {"job_id", "last_seq", "events"}
    assert body["job_id"] == "single"
    assert body["last_seq"] == 2
    (event,) = body["events"]
    assert set(event) == {"seq", "id", "ts"}
    assert event["seq"] == 2
    assert isinstance(event["id"], int)
    assert TS_RE.match(event["ts"])


async def test_append_answer_matches_stored_event(client: Client) -> None:
    """The seq, id and ts in the append's answer are those of the stored event."""
    await create_job(client, job_id="match")
    body = await append(client, "match", {"type": "progress", "progress": 1})
    stored = (await read_log(client, "match"))[-1]
    assert {k: stored[k] for k in ("seq", "id", "ts")} == body["events"][0]


async def test_append_batch_is_ordered(client: Client) -> None:
    """A batch is appended in order: consecutive seqs, increasing ids, the log in batch order."""
    await create_job(client, job_id="batch")
    body = await append(
        client,
        "batch",
        {"type": "log", "message": "a"},
        {"type": "progress", "progress": 10},
        {"type": "notification", "message": "c"},
    )
    assert body["last_seq"] == 4
    assert [e["seq"] for e in body["events"]] == [2, 3, 4]
    ids = [e["id"] for e in body["events"]]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    log = await read_log(client, "batch")
    assert [e["type"] for e in log] == ["created", "log", "progress", "notification"]


async def test_append_batch_of_one(client: Client) -> None:
    """``{"events": [one]}`` is a batch of one, answered like a single event."""
    await create_job(client, job_id="one")
    response = await post_events(client, "one", {"events": [{"type": "log", "message": "x"}]})
    assert response.status == 201
    assert [e["seq"] for e in (await response.json())["events"]] == [2]


async def test_event_ids_strictly_increase_across_jobs(client: Client) -> None:
    """Event ids increase strictly across all jobs, in commit order."""
    await create_job(client, job_id="a")
    await create_job(client, job_id="b")
    ids = []
    for job_id in ("a", "b", "a", "b", "b", "a"):
        body = await append(client, job_id, {"type": "log", "message": job_id})
        ids.append(body["events"][0]["id"])
    assert all(x < y for x, y in itertools.pairwise(ids))
    created_ids = [(await read_log(client, j))[0]["id"] for j in ("a", "b")]
    assert created_ids[0] < created_ids[1] < ids[0]


async def test_seq_is_per_job(client: Client) -> None:
    """Each job's seq counts its own events from 1 with no holes, whatever other jobs do."""
    await create_job(client, job_id="a")
    await create_job(client, job_id="b")
    await append(client, "a", {"type": "log", "message": "1"})
    await append(client, "b", {"type": "log", "message": "1"}, {"type": "log", "message": "2"})
    await append(client, "a", {"type": "log", "message": "2"})
    assert [e["seq"] for e in await read_log(client, "a")] == [1, 2, 3]
    assert [e["seq"] for e in await read_log(client, "b")] == [1, 2, 3]


async def test_concurrent_appends_keep_seq_contiguous(client: Client) -> None:
    """Appends sent at once to one job all land, with seqs 2..N+1 and no hole or repeat."""
    await create_job(client, job_id="busy")
    results = await asyncio.gather(
        *(append(client, "busy", {"type": "log", "message": str(i)}) for i in range(20))
    )
    seqs = sorted(r["events"][0]["seq"] for r in results)
    assert seqs == list(range(2, 22))
    assert await log_end(client, "busy") == 21


async def test_append_to_unknown_job_is_404(client: Client) -> None:
    """Appending to a job that does not exist is 404 job_not_found and creates nothing."""
    response = await post_events(client, "ghost", {"type": "log", "message": "x"})
    await assert_error(response, 404, "job_not_found")
    await assert_error(await client.get("/v1/jobs/ghost"), 404, "job_not_found")


async def test_stored_event_has_server_fields_and_omits_absent_ones(client: Client) -> None:
    """A stored event carries job_id, seq, id, type, ts and only the fields it was given."""
    await create_job(client, job_id="shape")
    await append(client, "shape", {"type": "progress", "phase": "load"})
    event = (await read_log(client, "shape"))[-1]
    assert set(event) == {"job_id", "seq", "id", "type", "ts", "phase"}
    assert event["job_id"] == "shape"
    assert event["type"] == "progress"


async def test_null_optional_field_is_omitted(client: Client) -> None:
    """``null`` for an optional event field means absent: it is not stored, never sent as null."""
    await create_job(client, job_id="nulls")
    await append(client, "nulls", {"type": "progress", "progress": 5, "phase": None, "data": None})
    event = (await read_log(client, "nulls"))[-1]
    assert "phase" not in event
    assert "data" not in event
    assert event["progress"] == 5


# -- event types and the snapshot --------------------------------------------------------------


async def test_progress_event_updates_snapshot(client: Client) -> None:
    """A progress event makes the job running and sets progress, phase, message, current, total."""
    await create_job(client, job_id="prog")
    await append(
        client,
        "prog",
        {
            "type": "progress",
            "progress": 42.5,
            "phase": "matching",
            "message": "Matching requirement 3 of 7",
            "current": 3,
            "total": 7,
            "data": {"quality_score": 0.93},
        },
    )
    snapshot = await get_snapshot(client, "prog")
    assert snapshot["status"] == "running"
    assert snapshot["progress"] == 42.5
    assert snapshot["phase"] == "matching"
    assert snapshot["message"] == "Matching requirement 3 of 7"
    assert (snapshot["current"], snapshot["total"]) == (3, 7)
    assert snapshot["last_seq"] == 2
    assert snapshot["finished_at"] is None
    event = (await read_log(client, "prog"))[-1]
    assert event["data"] == {"quality_score": 0.93}


async def test_progress_derived_from_current_and_total_is_stored(client: Client) -> None:
    """Without ``progress`` and with total > 0, the stored event holds 100*current/total."""
    await create_job(client, job_id="derive")
    await append(client, "derive", {"type": "progress", "current": 3, "total": 7})
    event = (await read_log(client, "derive"))[-1]
    assert event["progress"] == pytest.approx(100 * 3 / 7)
    assert (await get_snapshot(client, "derive"))["progress"] == event["progress"]


async def test_given_progress_is_not_overridden_by_current_total(client: Client) -> None:
    """A producer's own ``progress`` is stored as given, even with current/total present."""
    await create_job(client, job_id="given")
    await append(client, "given", {"type": "progress", "progress": 10, "current": 1, "total": 2})
    assert (await read_log(client, "given"))[-1]["progress"] == 10


async def test_progress_not_derived_when_total_is_zero(client: Client) -> None:
    """With total 0 nothing is derived (no division by zero, no progress field)."""
    await create_job(client, job_id="zero")
    await append(client, "zero", {"type": "progress", "current": 0, "total": 0})
    event = (await read_log(client, "zero"))[-1]
    assert "progress" not in event
    assert (event["current"], event["total"]) == (0, 0)


async def test_progress_keeps_earlier_fields_it_does_not_name(client: Client) -> None:
    """A progress event that names only some fields leaves the snapshot's others as they were."""
    await create_job(client, job_id="partial")
    await append(client, "partial", {"type": "progress", "progress": 30, "phase": "one"})
    await append(client, "partial", {"type": "progress", "message": "halfway"})
    snapshot = await get_snapshot(client, "partial")
    assert (snapshot["progress"], snapshot["phase"], snapshot["message"]) == (30, "one", "halfway")


async def test_log_event_stores_default_level(client: Client) -> None:
    """A log event without ``level`` is stored with ``level: "info"``."""
    await create_job(client, job_id="log")
    await append(client, "log", {"type": "log", "message": "hello"})
    event = (await read_log(client, "log"))[-1]
    assert event["level"] == "info"
    assert event["message"] == "hello"


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
async def test_log_event_stores_given_level(client: Client, level: str) -> None:
    """A log event's given level is stored as sent."""
    await create_job(client, job_id="lvl")
    await append(client, "lvl", {"type": "log", "message": "m", "level": level})
    assert (await read_log(client, "lvl"))[-1]["level"] == level


async def test_log_event_makes_job_running(client: Client) -> None:
    """A log event moves a queued job to running."""
    await create_job(client, job_id="logrun")
    await append(client, "logrun", {"type": "log", "message": "starting"})
    snapshot = await get_snapshot(client, "logrun")
    assert snapshot["status"] == "running"
    assert snapshot["last_seq"] == 2


async def test_completed_event_finishes_job(client: Client) -> None:
    """completed: status completed, progress 100, the result stored, finished_at = event ts."""
    await create_job(client, job_id="done")
    await append(client, "done", {"type": "progress", "progress": 40})
    body = await append(client, "done", {"type": "completed", "result": {"score": [1, 2]}})
    snapshot = await get_snapshot(client, "done")
    assert snapshot["status"] == "completed"
    assert snapshot["progress"] == 100
    assert snapshot["result"] == {"score": [1, 2]}
    assert snapshot["finished_at"] == body["events"][0]["ts"]
    assert snapshot["updated_at"] == body["events"][0]["ts"]
    assert snapshot["error"] is None


@pytest.mark.parametrize("result", [0, False, "", [], "text", 3.5])
async def test_completed_keeps_falsy_and_scalar_results(client: Client, result: Any) -> None:
    """``result`` may be any JSON value; falsy ones (0, false, "", []) are kept, not dropped."""
    await create_job(client, job_id="res")
    await append(client, "res", {"type": "completed", "result": result})
    assert (await read_log(client, "res"))[-1]["result"] == result
    assert (await get_snapshot(client, "res"))["result"] == result


async def test_failed_event_stores_error(client: Client) -> None:
    """failed: status failed, the error object in the snapshot, finished_at set."""
    await create_job(client, job_id="broke")
    error = {"message": "disk full", "code": "ENOSPC", "details": {"free": 0}}
    body = await append(client, "broke", {"type": "failed", "error": error})
    snapshot = await get_snapshot(client, "broke")
    assert snapshot["status"] == "failed"
    assert snapshot["error"] == error
    assert snapshot["finished_at"] == body["events"][0]["ts"]
    assert snapshot["result"] is None


async def test_cancelled_event_finishes_job(client: Client) -> None:
    """cancelled: status cancelled, finished_at set, the reason stored in the event."""
    await create_job(client, job_id="stop")
    body = await append(client, "stop", {"type": "cancelled", "reason": "user asked"})
    snapshot = await get_snapshot(client, "stop")
    assert snapshot["status"] == "cancelled"
    assert snapshot["finished_at"] == body["events"][0]["ts"]
    assert (await read_log(client, "stop"))[-1]["reason"] == "user asked"


@pytest.mark.parametrize("event_type", ["notification", "stage_completed", "a.b-c_9"])
async def test_custom_event_on_queued_job_keeps_status(client: Client, event_type: str) -> None:
    """A custom event is logged but leaves a queued job queued (only last_seq moves)."""
    await create_job(client, job_id="custom")
    await append(client, "custom", {"type": event_type, "message": "m", "data": {"k": 1}})
    snapshot = await get_snapshot(client, "custom")
    assert snapshot["status"] == "queued"
    assert snapshot["last_seq"] == 2
    event = (await read_log(client, "custom"))[-1]
    assert (event["type"], event["message"], event["data"]) == (event_type, "m", {"k": 1})


async def test_custom_event_on_running_job_keeps_progress_fields(client: Client) -> None:
    """A custom event leaves a running job running, its progress and message untouched."""
    await create_job(client, job_id="custom2")
    await append(client, "custom2", {"type": "progress", "progress": 20, "message": "working"})
    await append(client, "custom2", {"type": "stage_completed", "message": "stage 1"})
    snapshot = await get_snapshot(client, "custom2")
    assert snapshot["status"] == "running"
    assert (snapshot["progress"], snapshot["message"]) == (20, "working")
    assert snapshot["last_seq"] == 3


@pytest.mark.parametrize("event_type", ["created", "hello", "heartbeat", "ping", "pong", "error"])
async def test_reserved_type_is_refused(client: Client, event_type: str) -> None:
    """A reserved word that is not an appendable type is refused with 422 on ``type``."""
    await create_job(client, job_id="reserved")
    response = await post_events(client, "reserved", {"type": event_type, "message": "m"})
    error = await assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"] == ["type"]
    assert await log_end(client, "reserved") == 1


@pytest.mark.parametrize("event_type", ["Notification", "1st", "has space", "x" * 65, ""])
async def test_custom_type_outside_pattern_is_refused(client: Client, event_type: str) -> None:
    """A custom type not matching ``^[a-z][a-z0-9_.-]{0,63}$`` is refused with 422."""
    await create_job(client, job_id="badtype")
    response = await post_events(client, "badtype", {"type": event_type})
    error = await assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"] == ["type"]
    assert await log_end(client, "badtype") == 1


# -- terminal events close the log -------------------------------------------------------------


TERMINALS = [
    {"type": "completed"},
    {"type": "failed", "error": {"message": "x"}},
    {"type": "cancelled"},
]


@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda e: e["type"])
async def test_append_after_terminal_is_409(client: Client, terminal: dict[str, Any]) -> None:
    """After a terminal event any append is refused with 409 job_finished, nothing written."""
    await create_job(client, job_id="closed")
    await append(client, "closed", terminal)
    response = await post_events(client, "closed", {"type": "log", "message": "late"})
    error = await assert_error(response, 409, "job_finished")
    assert terminal["type"] in error["message"]
    assert await log_end(client, "closed") == 2


@pytest.mark.parametrize("terminal", TERMINALS, ids=lambda e: e["type"])
async def test_second_terminal_is_409(client: Client, terminal: dict[str, Any]) -> None:
    """A second terminal event is refused like any other append after the end."""
    await create_job(client, job_id="closed2")
    await append(client, "closed2", {"type": "completed"})
    await assert_error(await post_events(client, "closed2", terminal), 409, "job_finished")
    assert (await get_snapshot(client, "closed2"))["status"] == "completed"


async def test_terminal_mid_batch_refuses_whole_batch(client: Client) -> None:
    """A batch with events after its terminal event is 409 and writes none of its events."""
    await create_job(client, job_id="midbatch")
    response = await post_events(
        client,
        "midbatch",
        {
            "events": [
                {"type": "progress", "progress": 50},
                {"type": "completed"},
                {"type": "log", "message": "after the end"},
            ]
        },
    )
    await assert_error(response, 409, "job_finished")
    assert await log_end(client, "midbatch") == 1
    assert (await get_snapshot(client, "midbatch"))["status"] == "queued"


async def test_terminal_last_in_batch_is_accepted(client: Client) -> None:
    """A batch that ends with its terminal event is appended whole."""
    await create_job(client, job_id="lastbatch")
    body = await append(
        client, "lastbatch", {"type": "progress", "progress": 90}, {"type": "completed"}
    )
    assert body["last_seq"] == 3
    assert (await get_snapshot(client, "lastbatch"))["status"] == "completed"


# -- idempotency keys ---------------------------------------------------------------------------


async def test_keyed_batch_retry_is_200_duplicate(client: Client) -> None:
    """The same keyed batch twice: the second answer is 200, every event ``duplicate: true``,
    with the first answer's seq, id and ts, and nothing new in the log."""
    await create_job(client, job_id="idem")
    batch = {
        "events": [
            {"type": "log", "message": "a", "key": "k1"},
            {"type": "progress", "progress": 10, "key": "k2"},
        ]
    }
    first = await post_events(client, "idem", batch)
    assert first.status == 201
    first_body = await first.json()
    second = await post_events(client, "idem", batch)
    assert second.status == 200
    second_body = await second.json()
    assert second_body["job_id"] == "idem"
    assert second_body["last_seq"] == 3
    assert second_body["events"] == [{**e, "duplicate": True} for e in first_body["events"]]
    assert await log_end(client, "idem") == 3


async def test_keyed_single_retry_is_200_duplicate(client: Client) -> None:
    """A retried keyed single event answers 200 with the stored event's seq."""
    await create_job(client, job_id="idem1")
    event = {"type": "progress", "progress": 5, "key": "once"}
    first = await append(client, "idem1", event)
    response = await post_events(client, "idem1", event)
    assert response.status == 200
    body = await response.json()
    assert body["events"] == [{**first["events"][0], "duplicate": True}]
    assert await log_end(client, "idem1") == 2


async def test_key_is_the_identity_whatever_the_body(client: Client) -> None:
    """A retry with the same key but a different body is still a duplicate; the first stays."""
    await create_job(client, job_id="idem2")
    await append(client, "idem2", {"type": "log", "message": "original", "key": "same"})
    response = await post_events(
        client, "idem2", {"type": "progress", "progress": 99, "key": "same"}
    )
    assert response.status == 200
    assert (await response.json())["events"][0]["duplicate"] is True
    log = await read_log(client, "idem2")
    assert len(log) == 2
    assert log[-1]["message"] == "original"
    assert (await get_snapshot(client, "idem2"))["progress"] is None


async def test_concurrent_keyed_batches_store_one_copy(client: Client) -> None:
    """The same keyed batch sent many times at once is stored exactly once; one answer is
    201, the others 200 duplicates pointing at the same seqs."""
    await create_job(client, job_id="race")
    batch = {
        "events": [
            {"type": "log", "message": "x", "key": "r1"},
            {"type": "log", "message": "y", "key": "r2"},
        ]
    }
    responses = await asyncio.gather(*(post_events(client, "race", batch) for _ in range(10)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 9 + [201]
    bodies = [await r.json() for r in responses]
    positions = {tuple((e["seq"], e["id"], e["ts"]) for e in b["events"]) for b in bodies}
    assert len(positions) == 1
    log = await read_log(client, "race")
    assert [e["message"] for e in log[1:]] == ["x", "y"]


async def test_keyed_retry_after_finish_is_200(client: Client) -> None:
    """A retried keyed event stays a duplicate after the job has finished: 200, not 409."""
    await create_job(client, job_id="late-retry")
    await append(client, "late-retry", {"type": "log", "message": "m", "key": "before"})
    await append(client, "late-retry", {"type": "completed", "key": "end"})
    for key in ("before", "end"):
        response = await post_events(
            client, "late-retry", {"type": "log", "message": "m", "key": key}
        )
        assert response.status == 200, await response.text()
        assert (await response.json())["events"][0]["duplicate"] is True
    assert await log_end(client, "late-retry") == 3


async def test_keyed_terminal_retry_after_finish_is_200(client: Client) -> None:
    """Retrying the very keyed batch that finished the job is answered 200 duplicates."""
    await create_job(client, job_id="fin-retry")
    batch = {
        "events": [
            {"type": "progress", "progress": 90, "key": "p"},
            {"type": "completed", "key": "c"},
        ]
    }
    assert (await post_events(client, "fin-retry", batch)).status == 201
    response = await post_events(client, "fin-retry", batch)
    assert response.status == 200
    assert all(e["duplicate"] for e in (await response.json())["events"])


async def test_same_key_twice_in_one_batch_is_422(client: Client) -> None:
    """One key twice in the same batch is 422 (loc on the second one's key), nothing written."""
    await create_job(client, job_id="dupkey")
    response = await post_events(
        client,
        "dupkey",
        {
            "events": [
                {"type": "log", "message": "a", "key": "k"},
                {"type": "log", "message": "b", "key": "k"},
            ]
        },
    )
    error = await assert_error(response, 422, "validation_error")
    assert ["events", 1, "key"] in [d["loc"] for d in error["details"]]
    assert await log_end(client, "dupkey") == 1


async def test_mixed_batch_appends_only_new_events(client: Client) -> None:
    """A batch of a duplicate and a new event: 201; the duplicate answered from the log,
    the new one appended."""
    await create_job(client, job_id="mixed")
    first = await append(client, "mixed", {"type": "log", "message": "a", "key": "old"})
    response = await post_events(
        client,
        "mixed",
        {
            "events": [
                {"type": "log", "message": "a", "key": "old"},
                {"type": "log", "message": "b", "key": "new"},
            ]
        },
    )
    assert response.status == 201
    body = await response.json()
    assert body["events"][0] == {**first["events"][0], "duplicate": True}
    assert body["events"][1]["seq"] == 3
    assert "duplicate" not in body["events"][1]
    assert body["last_seq"] == 3
    assert [e["message"] for e in (await read_log(client, "mixed"))[1:]] == ["a", "b"]


async def test_mixed_batch_after_finish_is_409(client: Client) -> None:
    """After the end, a batch with a duplicate and a new event is 409: the new one cannot land."""
    await create_job(client, job_id="mixed-end")
    await append(client, "mixed-end", {"type": "completed", "key": "c"})
    response = await post_events(
        client,
        "mixed-end",
        {"events": [{"type": "completed", "key": "c"}, {"type": "log", "message": "new"}]},
    )
    await assert_error(response, 409, "job_finished")
    assert await log_end(client, "mixed-end") == 2


async def test_keys_are_unique_per_job_only(client: Client) -> None:
    """The same key on two jobs names two different events: both are appended."""
    await create_job(client, job_id="ka")
    await create_job(client, job_id="kb")
    await append(client, "ka", {"type": "log", "message": "a", "key": "shared"})
    body = await append(client, "kb", {"type": "log", "message": "b", "key": "shared"})
    assert body["events"][0]["seq"] == 2
    assert "duplicate" not in body["events"][0]


async def test_unkeyed_repeat_is_appended_twice(client: Client) -> None:
    """Without a key, sending the same event twice appends it twice."""
    await create_job(client, job_id="nokey")
    await append(client, "nokey", {"type": "log", "message": "same"})
    await append(client, "nokey", {"type": "log", "message": "same"})
    assert await log_end(client, "nokey") == 3


# -- GET /v1/jobs/{job_id}/events --------------------------------------------------------------


async def _job_with_events(client: Client, job_id: str, count: int) -> None:
    await create_job(client, job_id=job_id)
    await append(client, job_id, *({"type": "log", "message": str(i)} for i in range(count)))


async def test_events_page_whole_log(client: Client) -> None:
    """The default page is the whole (short) log with last_seq and next_after null."""
    await _job_with_events(client, "page", 4)
    response = await client.get("/v1/jobs/page/events")
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"events", "last_seq", "next_after"}
    assert [e["seq"] for e in body["events"]] == [1, 2, 3, 4, 5]
    assert body["last_seq"] == 5
    assert body["next_after"] is None


async def test_events_page_after(client: Client) -> None:
    """``after=N`` starts the page at seq N+1."""
    await _job_with_events(client, "after", 4)
    body = await (await client.get("/v1/jobs/after/events?after=3")).json()
    assert [e["seq"] for e in body["events"]] == [4, 5]
    assert body["next_after"] is None


async def test_events_page_limit_sets_next_after(client: Client) -> None:
    """``limit`` caps the page; next_after is the last seq given while more remain."""
    await _job_with_events(client, "lim", 4)
    body = await (await client.get("/v1/jobs/lim/events?after=1&limit=2")).json()
    assert [e["seq"] for e in body["events"]] == [2, 3]
    assert body["next_after"] == 3
    assert body["last_seq"] == 5


async def test_events_pages_walk_the_log_once(client: Client) -> None:
    """Following next_after from 0 with a small limit yields every event exactly once."""
    await _job_with_events(client, "walk", 9)
    seqs: list[int] = []
    after: int | None = 0
    while after is not None:
        response = await client.get(f"/v1/jobs/walk/events?after={after}&limit=4")
        body = await response.json()
        seqs.extend(e["seq"] for e in body["events"])
        after = body["next_after"]
    assert seqs == list(range(1, 11))


async def test_events_page_at_end_is_empty(client: Client) -> None:
    """``after`` equal to last_seq gives an empty page and next_after null."""
    await _job_with_events(client, "end", 2)
    body = await (await client.get("/v1/jobs/end/events?after=3")).json()
    assert body == {"events": [], "last_seq": 3, "next_after": None}


async def test_events_page_limit_up_to_page_size_max(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """limit equal to limits.page_size_max is allowed; the default page obeys it too."""
    client = await make_client(make_config(limits__page_size_max=3))
    await _job_with_events(client, "cap", 5)
    body = await (await client.get("/v1/jobs/cap/events?limit=3")).json()
    assert len(body["events"]) == 3
    default = await (await client.get("/v1/jobs/cap/events")).json()
    assert [e["seq"] for e in default["events"]] == [1, 2, 3]
    assert default["next_after"] == 3


@pytest.mark.parametrize(
    "query",
    ["after=-1", "after=abc", "after=1.5", "after=4", "after=99", "after=0%0A", "after=%0A0",
     "after=%D9%A3", "limit=0", "limit=-2", "limit=abc", "limit=1001", "limit=1%0A"],
)  # fmt: skip
@pytest.mark.parametrize("accept", ["application/json", "application/x-ndjson"])
async def test_events_page_bad_parameter_is_400(client: Client, query: str, accept: str) -> None:
    """A bad ``after`` (negative, not plain ASCII digits, a trailing newline, past last_seq)
    or ``limit`` (0, not an integer, over page_size_max) is 400 invalid_parameter, on the
    JSON page and on the NDJSON export alike."""
    await _job_with_events(client, "badq", 2)
    response = await client.get(f"/v1/jobs/badq/events?{query}", headers={"Accept": accept})
    await assert_error(response, 400, "invalid_parameter")


async def test_events_of_unknown_job_is_404(client: Client) -> None:
    """The events page of a job that does not exist is 404 job_not_found."""
    await assert_error(await client.get("/v1/jobs/nope/events"), 404, "job_not_found")


async def test_events_ndjson_export(client: Client) -> None:
    """With ``Accept: application/x-ndjson`` the log comes as one stored event per line."""
    await _job_with_events(client, "nd", 3)
    response = await client.get("/v1/jobs/nd/events", headers={"Accept": "application/x-ndjson"})
    assert response.status == 200
    assert response.content_type == "application/x-ndjson"
    text = await response.text()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines == await read_log(client, "nd")


async def test_events_ndjson_spans_many_pages(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """The NDJSON export is the whole log from ``after``, beyond limits.page_size_max events,
    including a log that is an exact multiple of the page size."""
    client = await make_client(make_config(limits__page_size_max=3))
    await _job_with_events(client, "big", 10)  # 11 events
    await _job_with_events(client, "exact", 5)  # 6 events: two full pages
    for job_id, count in (("big", 11), ("exact", 6)):
        response = await client.get(
            f"/v1/jobs/{job_id}/events", headers={"Accept": "application/x-ndjson"}
        )
        lines = (await response.text()).splitlines()
        assert [json.loads(line)["seq"] for line in lines] == list(range(1, count + 1))


async def test_events_ndjson_from_after(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """The NDJSON export starts after ``after`` and ignores the page ``limit``."""
    client = await make_client(make_config(limits__page_size_max=2))
    await _job_with_events(client, "ndafter", 6)
    response = await client.get(
        "/v1/jobs/ndafter/events?after=2&limit=1", headers={"Accept": "application/x-ndjson"}
    )
    lines = (await response.text()).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [3, 4, 5, 6, 7]


async def test_events_ndjson_at_end_is_empty(client: Client) -> None:
    """An NDJSON export from the log's end is an empty 200 body."""
    await _job_with_events(client, "ndend", 1)
    response = await client.get(
        "/v1/jobs/ndend/events?after=2", headers={"Accept": "application/x-ndjson"}
    )
    assert response.status == 200
    assert await response.text() == ""


async def test_events_ndjson_unknown_job_is_404(client: Client) -> None:
    """An NDJSON export of an unknown job is a 404 in the error shape, not an empty stream."""
    response = await client.get("/v1/jobs/nope/events", headers={"Accept": "application/x-ndjson"})
    await assert_error(response, 404, "job_not_found")


async def test_events_ndjson_bad_after_is_400(client: Client) -> None:
    """An NDJSON export with a bad ``after`` is 400 invalid_parameter."""
    await _job_with_events(client, "ndbad", 1)
    for after in ("-1", "x", "5"):
        response = await client.get(
            f"/v1/jobs/ndbad/events?after={after}", headers={"Accept": "application/x-ndjson"}
        )
        await assert_error(response, 400, "invalid_parameter")


# -- health and routing ------------------------------------------------------------------------


async def test_healthz_is_200(client: Client) -> None:
    """GET /healthz answers 200 while the process is up."""
    response = await client.get("/healthz")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_readyz_is_200_when_storage_is_open(client: Client) -> None:
    """GET /readyz answers 200 with the store open and migrations applied."""
    response = await client.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ready"
    assert body["schema_version"] >= 1


@pytest.mark.parametrize("path", ["/nope", "/v1", "/v1/jobs/a/b/c", "/v2/jobs"])
async def test_unknown_route_is_404_in_error_shape(client: Client, path: str) -> None:
    """A path with no route answers 404 not_found in the protocol's error shape."""
    await assert_error(await client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/jobs"), ("DELETE", "/v1/jobs/x/events"), ("PATCH", "/v1/jobs/x/events"),
     ("POST", "/healthz")],
)  # fmt: skip
async def test_wrong_method_is_405_in_error_shape(client: Client, method: str, path: str) -> None:
    """A known path with a method it does not take answers 405 with Allow, in the error shape."""
    response = await client.request(method, path)
    await assert_error(response, 405, "method_not_allowed")
    assert "Allow" in response.headers


async def test_current_and_total_combine_across_events(client: TestClient[Any, Any]) -> None:
    """`total` from one event and `current` from a later one derive the stored progress, and
    a `current` beyond the job's total is refused 422 with nothing written."""
    await create_job(client, job_id="split-counts")
    await append(client, "split-counts", {"type": "progress", "total": 8})
    result = await append(client, "split-counts", {"type": "progress", "current": 2})
    events = (await (await client.get("/v1/jobs/split-counts/events?after=2")).json())["events"]
    assert events[0]["progress"] == 25.0
    over = await client.post(
        "/v1/jobs/split-counts/events", json={"type": "progress", "current": 9}
    )
    body = await assert_error(over, 422, "validation_error")
    assert body["details"][0]["loc"] == ["current"]
    snapshot = await (await client.get("/v1/jobs/split-counts")).json()
    assert (snapshot["current"], snapshot["total"], snapshot["progress"]) == (2, 8, 25.0)
    assert snapshot["last_seq"] == result["last_seq"]


async def test_bodiless_create_makes_a_job(client: TestClient[Any, Any]) -> None:
    """POST /v1/jobs with no body at all (no Content-Type) creates a job with a server id."""
    response = await client.post("/v1/jobs")
    assert response.status == 201, await response.text()
    assert (await response.json())["metadata"] is None


async def test_stream_responses_carry_the_request_id(client: TestClient[Any, Any]) -> None:
    """X-Request-ID is echoed on every response, streaming ones included."""
    await create_job(client, job_id="rid")
    headers = {"X-Request-ID": "trace-123", "Accept": "application/x-ndjson"}
    response = await client.get("/v1/jobs/rid/events", headers=headers)
    assert response.headers["X-Request-ID"] == "trace-123"
    await response.read()


async def test_every_json_body_ends_with_a_newline(client: Client) -> None:
    """Each JSON answer, success or error, is one document and one line feed, so that curl
    prints it as a whole line (schemathesis checks the same on every generated request)."""
    await create_job(client, job_id="nl")
    answers = [
        await client.post("/v1/jobs", json={"job_id": "nl2"}),
        await client.post("/v1/jobs/nl/events", json={"type": "log", "message": "m"}),
        await client.get("/v1/jobs"),
        await client.get("/v1/jobs/nl"),
        await client.get("/v1/jobs/nl/events"),
        await client.get("/v1/openapi.json"),
        await client.get("/healthz"),
        await client.get("/readyz"),
        await client.get("/v1/jobs/nope"),
        await client.get("/v1/jobs?limit=0"),
        await client.get("/nowhere"),
        await client.delete("/v1/jobs/nl/events"),
        await client.post("/v1/jobs", json={"job_id": "nl"}),
        await client.post("/v1/jobs/nl/events", json={"type": "log"}),
        await client.get("/v1/jobs/nl/stream"),
    ]
    for response in answers:
        raw = await response.read()
        assert response.content_type == "application/json", response
        assert raw.endswith(b"\n"), (response.url, raw[-80:])
        assert raw.count(b"\n") == 1, (response.url, raw[-80:])
        json.loads(raw)


async def test_empty_query_values_count_as_absent(client: Client) -> None:
    """``?status=&kind=&limit=&cursor=`` and ``?after=&limit=&epoch=`` answer as if the
    parameters were absent (the OpenAPI document says so with ``allowEmptyValue``)."""
    await _job_with_events(client, "empties", 2)
    plain = await (await client.get("/v1/jobs")).json()
    empty = await client.get("/v1/jobs?status=&kind=&limit=&cursor=")
    assert empty.status == 200
    assert await empty.json() == plain
    plain = await (await client.get("/v1/jobs/empties/events")).json()
    empty = await client.get("/v1/jobs/empties/events?after=&limit=&epoch=")
    assert empty.status == 200
    assert await empty.json() == plain


async def test_list_jobs_filters_by_id_prefix(client: Client) -> None:
    """``prefix=`` lists the jobs whose id starts with it (case-sensitively), with the other
    filters and the cursor; a prefix no job id can start with is 400."""
    for job_id in ("build-1", "build-2", "Build-3", "builder", "deploy-1", "build"):
        await create_job(client, job_id=job_id, kind="ci" if job_id != "build-2" else "cd")
    ids = await list_ids(client, "?prefix=build-")
    assert ids == ["build-2", "build-1"]
    assert await list_ids(client, "?prefix=build") == ["build", "builder", "build-2", "build-1"]
    assert await list_ids(client, "?prefix=build-&kind=ci") == ["build-1"]
    first = await client.get("/v1/jobs?prefix=build&limit=3")
    page = await first.json()
    assert [job["job_id"] for job in page["jobs"]] == ["build", "builder", "build-2"]
    rest = await list_ids(client, f"?prefix=build&cursor={page['next_cursor']}")
    assert rest == ["build-1"]
    for bad in ("b%20", "%C3%A9", "x" * 129):
        response = await client.get(f"/v1/jobs?prefix={bad}")
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_parameter"


async def list_ids(client: Client, query: str) -> list[str]:
    response = await client.get(f"/v1/jobs{query}")
    assert response.status == 200, await response.text()
    return [job["job_id"] for job in (await response.json())["jobs"]]
