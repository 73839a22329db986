"""``GET /metrics``: the Prometheus text after real traffic against the real app, parsed with
prometheus-client's own parser; every counter moves by exactly what was done, and no label
takes a value that grows with use (operations.md, Metrics)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    SECRET,
    ClientFactory,
    ConfigFactory,
    append,
    auth_settings,
    bearer,
    create_job,
    token,
)
from tests.procs import launching
from tests.streams import StuckSubscriber, read_sse, read_ws

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
METRICS_TOKEN = "metrics-token-0123456789-abcdefghijklmnop"
# Every label and the values it may take: a closed set written in the code.
SOURCES = ("cache", "database", "push")
BOUNDED_LABELS = {
    "source",
    "version",
    "outcome",
    "transport",
    "kind",
    "code",
    "cache",
    "le",
    "status",  # jobfeed_jobs: the five job statuses
    "reason",  # deletions: api, retention
}


async def scrape(client: TestClient[Any, Any], **headers: str) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_counters_move_by_exactly_what_was_done(client: TestClient[Any, Any]) -> None:
    """Appends (created, duplicate, refused), events and commits, a WebSocket stream the
    client leaves, an SSE stream that ends with its job, and a refusal: each counter moves by
    exactly that much, the histograms count every append, and the open streams return to 0."""
    before = await scrape(client)
    await create_job(client, job_id="m1")
    for n in range(5):
        await append(client, "m1", {"type": "progress", "current": n, "key": f"k{n}"})
    duplicate = await client.post(
        "/v1/jobs/m1/events", json={"type": "progress", "current": 0, "key": "k0"}
    )
    assert duplicate.status == 200
    invalid = await client.post("/v1/jobs/m1/events", json={"type": 5})
    assert invalid.status == 422
    missing = await client.get("/v1/jobs/nope")
    assert missing.status == 404
    left = await read_ws(client, "/v1/jobs/m1/stream?after=0", drop_after=2)
    assert not left.ended
    await append(client, "m1", {"type": "completed"})
    await read_ws(client, "/v1/feed?after=0", drop_after=1)
    async with client.get("/v1/feed?after=0", headers={"Accept": "text/event-stream"}) as feed:
        assert feed.status == 200
        await feed.content.readuntil(b"\n\n")  # its hello; then the client goes away
    closes = "jobfeed_stream_closes_total"
    middle = await scrape_when(
        client,
        (closes, {"transport": "ws", "kind": "job", "outcome": "client_gone"}),
        (closes, {"transport": "ws", "kind": "feed", "outcome": "client_gone"}),
        (closes, {"transport": "sse", "kind": "feed", "outcome": "client_gone"}),
    )
    # The only stream from here on: an SSE subscriber reads the whole, finished log.
    done = await read_sse(client, "/v1/jobs/m1/stream?after=0")
    assert done.ended
    assert len(done.events) == 7  # created, 5 progress, completed
    after = await scrape_when(
        client, (closes, {"transport": "sse", "kind": "job", "outcome": "done"})
    )
    sent = "jobfeed_frames_sent_total"
    assert sum(moved(middle, after, sent, kind="job", source=s) for s in SOURCES) == 7
    assert sum(moved(before, after, sent, kind="feed", source=s) for s in SOURCES) >= 1

    def delta(name: str, **labels: str) -> float:
        return moved(before, after, name, **labels)

    assert delta("jobfeed_append_requests_total", outcome="created") == 6
    assert delta("jobfeed_append_requests_total", outcome="duplicate") == 1
    assert delta("jobfeed_append_requests_total", outcome="refused") == 1
    assert delta("jobfeed_append_requests_total", outcome="failed") == 0
    assert delta("jobfeed_events_appended_total") == 7  # the job's created event too
    # One commit per request here: each was answered before the next was sent.
    assert delta("jobfeed_commits_total") == 7
    assert delta("jobfeed_commit_group_events_count") == 7
    assert delta("jobfeed_commit_group_events_sum") == 7
    assert delta("jobfeed_commit_group_events_bucket", le="1.0") == 7
    # Every request that reached the writer: the 6 stored and the duplicate.
    assert delta("jobfeed_append_ack_seconds_count") == 7
    assert delta("jobfeed_append_ack_seconds_bucket", le="+Inf") == 7
    assert delta("jobfeed_streams_opened_total", transport="ws", kind="job") == 1
    assert delta("jobfeed_streams_opened_total", transport="sse", kind="job") == 1
    assert delta(closes, transport="sse", kind="job", outcome="done") == 1
    for transport in ("ws", "sse"):
        assert delta("jobfeed_streams_opened_total", transport=transport, kind="feed") == 1
        assert delta(closes, transport=transport, kind="feed", outcome="client_gone") == 1
    assert delta(closes, transport="ws", kind="job", outcome="client_gone") == 1
    for transport in ("ws", "sse"):
        for kind in ("job", "feed"):
            assert value(after, "jobfeed_streams_open", transport=transport, kind=kind) == 0
    assert delta("jobfeed_refusals_total", code="validation_error") == 1
    assert delta("jobfeed_refusals_total", code="job_not_found") == 1
    assert value(after, "jobfeed_writer_queue_events") == 0
    assert value(after, "jobfeed_storage_faults_total") == 0
    assert value(after, "jobfeed_storage_healthy") == 1
    assert value(after, "jobfeed_database_bytes") > 0
    assert value(after, "jobfeed_wal_bytes") >= 0
    assert value(after, "jobfeed_job_cache_jobs") == 1
    assert value(after, "jobfeed_job_cache_bytes") > 0
    assert value(after, "jobfeed_frame_cache_bytes", cache="job") > 0
    assert value(after, "jobfeed_frame_cache_bytes", cache="feed") > 0
    assert {name for name, labels in after for key, _ in labels} <= {
        name for name, _ in after
    }  # every labelled sample belongs to a family
    assert {key for _, labels in after for key, _ in labels} <= BOUNDED_LABELS
    # No label value names the job (its id is the only thing here that grows with use).
    assert not any("m1" in v for _, labels in after for _, v in labels)


async def test_open_streams_and_a_stuck_reader_cut_off(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """An open WebSocket is counted in ``jobfeed_streams_open`` while it lasts; a reader that
    stops reading is closed for ``send_timeout`` and counted so (who is cut off and why)."""
    config = make_config(stream__send_timeout=0.5, stream__send_buffer_bytes=4096)
    client = await make_client(config)
    await create_job(client, job_id="slow")
    before = await scrape(client)
    stuck = await StuckSubscriber.connect(
        str(client.host), int(client.port or 0), "/v1/jobs/slow/stream?after=0"
    )
    opened = await scrape_when(client, ("jobfeed_streams_open", {"transport": "ws", "kind": "job"}))
    assert value(opened, "jobfeed_streams_open", transport="ws", kind="job") == 1
    payload = "x" * 30_000
    for _ in range(20):  # far more than the small socket buffers hold
        await append(client, "slow", {"type": "log", "message": payload})
    cut_off = {"transport": "ws", "kind": "job", "outcome": "send_timeout"}
    after = await scrape_when(client, ("jobfeed_stream_closes_total", cut_off))
    await asyncio.to_thread(stuck.read_rest)
    assert (
        moved(
            before,
            after,
            "jobfeed_stream_closes_total",
            transport="ws",
            kind="job",
            outcome="send_timeout",
        )
        == 1
    )
    assert value(after, "jobfeed_streams_open", transport="ws", kind="job") == 0
    assert moved(before, after, "jobfeed_events_appended_total") == 20


async def test_subscriber_lag_counts_a_stuck_reader_and_not_a_live_one(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A WebSocket that stops reading falls behind its job's log: it is counted in
    ``jobfeed_subscribers_behind`` and its lag (events committed, not yet handed to its
    socket) is in ``jobfeed_subscriber_lag_events`` and ``..._max_events``; a feed that
    reads everything, parked at the end of the log, is behind by nothing."""
    config = make_config(stream__send_timeout=60, stream__send_buffer_bytes=4096)
    client = await make_client(config)
    await create_job(client, job_id="lagging")
    ws_job = {"transport": "ws", "kind": "job"}
    ws_feed = {"transport": "ws", "kind": "feed"}
    stuck = await StuckSubscriber.connect(
        str(client.host), int(client.port or 0), "/v1/jobs/lagging/stream?after=0"
    )
    async with client.ws_connect("/v1/feed") as feed:
        async with asyncio.timeout(30):
            hello = json.loads((await feed.receive()).data)
        appended = 40
        for _ in range(appended):  # far more than the small socket buffers hold
            await append(client, "lagging", {"type": "log", "message": "x" * 30_000})
        last_id = hello["last_id"] + appended
        async with asyncio.timeout(30):
            while json.loads((await feed.receive()).data).get("id") != last_id:
                pass
        samples = await scrape_when(client, ("jobfeed_subscribers_behind", ws_job))
        assert value(samples, "jobfeed_subscribers_behind", **ws_job) == 1
        lag = value(samples, "jobfeed_subscriber_lag_events", **ws_job)
        assert 0 < lag <= appended
        assert value(samples, "jobfeed_subscriber_lag_max_events", **ws_job) == lag
        assert value(samples, "jobfeed_subscribers_behind", **ws_feed) == 0
        assert value(samples, "jobfeed_subscriber_lag_events", **ws_feed) == 0
    stuck.sock.close()


async def scrape_when(client: TestClient[Any, Any], *wanted: tuple[str, dict[str, str]]) -> Samples:
    """Scrape until every ``(name, labels)`` in ``wanted`` is non-zero (a stream's end is
    counted when its handler finishes, just after the client sees it); bounded generously."""
    async with asyncio.timeout(30):
        while True:
            samples = await scrape(client)
            if all(value(samples, name, **labels) for name, labels in wanted):
                return samples
            await asyncio.sleep(0.02)


async def test_authentication_on_needs_admin_or_the_metrics_token(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """With authentication on: no credential 401, a token without jobs:admin 403, a
    jobs:admin token or the ``[metrics] token`` 200."""
    config = make_config(**auth_settings(metrics__token=METRICS_TOKEN))
    client = await make_client(config, credential=None)
    assert (await client.get("/metrics")).status == 401
    reader = await client.get("/metrics", headers=bearer(token(scope="jobs:read jobs:write")))
    assert reader.status == 403
    assert (await client.get("/metrics", headers=bearer("not-the-metrics-token"))).status == 401
    await scrape(client, **bearer(token(scope="jobs:admin")))
    samples = await scrape(client, **bearer(METRICS_TOKEN))
    assert value(samples, "jobfeed_refusals_total", code="unauthorized") == 2
    assert value(samples, "jobfeed_refusals_total", code="forbidden") == 1


async def test_disabled_is_not_found(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """``[metrics] enabled = false``: there is no /metrics (404)."""
    client = await make_client(make_config(metrics__enabled="false"))
    assert (await client.get("/metrics")).status == 404


async def test_dashboard_and_alerts_name_only_exported_metrics(
    client: TestClient[Any, Any],
) -> None:
    """docs/grafana-dashboard.json, docs/prometheus-alerts.yml and docs/operations.md use
    only names /metrics exports: a renamed metric cannot leave a dead panel or alert."""
    text = await (await client.get("/metrics")).text()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    exported = families | {f"{f}{end}" for f in families for end in ("_bucket", "_sum", "_count")}
    docs = Path(__file__).parent.parent / "docs"
    for doc in ("grafana-dashboard.json", "prometheus-alerts.yml", "operations.md"):
        named = set(re.findall(r"\bjobfeed_[a-z_]+[a-z]", (docs / doc).read_text()))
        assert named, doc
        assert named <= exported, (doc, named - exported)


async def test_own_address_in_a_real_process(tmp_path: Path) -> None:
    """``[metrics] host`` / ``port``: ``jobfeed serve`` answers /metrics on that address
    (port 0: logged as ``metrics_listening``) and no longer on the API's, and with
    authentication on the same credential rules hold there."""
    with launching(tmp_path) as launcher:
        server = await launcher.start(
            metrics__host="127.0.0.1",
            metrics__port=0,
            auth__mode="jwt",
            auth__secrets=f'["{SECRET}"]',
            metrics__token=METRICS_TOKEN,
        )
        # Logged after "listening" (the API's site starts first): wait for it, do not peek.
        line = await asyncio.to_thread(server.log.wait_for, "metrics_listening", 30)
        assert line is not None, server.describe()
        metrics_url = f"http://127.0.0.1:{line['port']}/metrics"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/metrics") as on_api:
                assert on_api.status == 404
            async with session.get(metrics_url) as anonymous:
                assert anonymous.status == 401
                assert (await anonymous.json())["error"]["code"] == "unauthorized"
            async with session.get(metrics_url, headers=bearer(METRICS_TOKEN)) as scraped:
                assert scraped.status == 200
                text = await scraped.text()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "jobfeed_build_info" in names
    assert 'jobfeed_refusals_total{code="unauthorized"} 1' in text
