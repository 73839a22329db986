"""Large responses read and sent in byte-bounded parts say exactly what whole ones said.

``stream.page_bytes`` = 1 makes every read from SQLite return a single event (or snapshot),
so the events page, the NDJSON export and the job list are each assembled from many parts;
their bodies must be the same JSON, in the same order, with the same cursors.
"""

from __future__ import annotations

from typing import Any

import orjson

from tests.conftest import ClientFactory, ConfigFactory, append, create_job


async def test_parts_of_one_event_make_the_same_events_page(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """An events page read one event at a time holds the page's events, in order, and the
    same ``last_seq`` and ``next_after``; an empty page is still valid JSON."""
    client = await make_client(make_config(stream__page_bytes=1))
    await create_job(client, job_id="p")
    for index in range(7):
        await append(client, "p", {"type": "log", "message": f"m{index}"})
    response = await client.get("/v1/jobs/p/events", params={"after": 2, "limit": 3})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    page = orjson.loads(await response.read())
    assert [event["seq"] for event in page["events"]] == [3, 4, 5]
    assert (page["last_seq"], page["next_after"]) == (8, 5)
    response = await client.get("/v1/jobs/p/events", params={"after": 5})
    page = orjson.loads(await response.read())
    assert [event["seq"] for event in page["events"]] == [6, 7, 8]
    assert page["next_after"] is None
    response = await client.get("/v1/jobs/p/events", params={"after": 8})
    assert orjson.loads(await response.read()) == {
        "events": [],
        "last_seq": 8,
        "next_after": None,
    }


async def test_parts_of_one_event_make_the_same_export(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """The NDJSON export read one event at a time has every event past ``after``, once."""
    client = await make_client(make_config(stream__page_bytes=1))
    await create_job(client, job_id="x")
    for index in range(5):
        await append(client, "x", {"type": "log", "message": f"m{index}"})
    response = await client.get(
        "/v1/jobs/x/events", params={"after": 1}, headers={"Accept": "application/x-ndjson"}
    )
    assert response.status == 200
    lines = (await response.read()).splitlines()
    assert [orjson.loads(line)["seq"] for line in lines] == [2, 3, 4, 5, 6]


async def test_parts_of_one_snapshot_make_the_same_job_list(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """With a byte budget of one snapshot, a job list page holds one job and next_cursor
    goes on from it: paging through gives every job once, newest first, with filters and
    cursors as before (one read per page keeps the page and its feed cursor of one moment)."""
    client = await make_client(make_config(stream__page_bytes=1))
    for index in range(7):
        await create_job(client, job_id=f"j{index}", kind="odd" if index % 2 else "even")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get("/v1/jobs", params=params)
        assert response.status == 200
        body = orjson.loads(await response.read())
        assert len(body["jobs"]) <= 3
        seen.extend(job["job_id"] for job in body["jobs"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"j{index}" for index in reversed(range(7))]
    odd: list[str] = []
    cursor = None
    while True:
        params = {"kind": "odd", "limit": 10, **({} if cursor is None else {"cursor": cursor})}
        response = await client.get("/v1/jobs", params=params)
        body = orjson.loads(await response.read())
        assert len(body["jobs"]) <= 1
        odd.extend(job["job_id"] for job in body["jobs"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert odd == ["j5", "j3", "j1"]


async def test_head_of_a_streamed_answer_has_headers_and_no_body(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """HEAD on the events page, the export and the job list answers 200 with the GET's
    headers and no body, and the connection stays usable for the next request."""
    client = await make_client(make_config())
    await create_job(client, job_id="h")
    for path, accept in [
        ("/v1/jobs/h/events", "application/json"),
        ("/v1/jobs/h/events", "application/x-ndjson"),
        ("/v1/jobs", "application/json"),
    ]:
        response = await client.head(path, headers={"Accept": accept})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith(accept)
        assert await response.read() == b""
        response = await client.get("/v1/jobs/h/events")
        assert response.status == 200
        assert orjson.loads(await response.read())["last_seq"] == 1


async def test_small_answers_have_a_length_and_large_ones_are_chunked(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A body that fits in one 64 KiB piece (most pages, every snapshot under it) goes out
    with Content-Length, as before; a larger one is chunked and arrives whole."""
    client = await make_client(make_config())
    await create_job(client, job_id="s", metadata={"note": "small"})
    for path in ["/v1/jobs/s", "/v1/jobs/s/events", "/v1/jobs"]:
        response = await client.get(path)
        body = await response.read()
        assert response.headers["Content-Length"] == str(len(body))
        assert "Transfer-Encoding" not in response.headers
    for _ in range(3):
        await append(client, "s", {"type": "log", "message": "z" * 30_000})
    response = await client.get("/v1/jobs/s/events")
    assert response.headers["Transfer-Encoding"] == "chunked"
    page = orjson.loads(await response.read())
    assert [event["seq"] for event in page["events"]] == [1, 2, 3, 4]
