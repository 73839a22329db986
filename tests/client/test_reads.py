"""One-shot reads: ``jobs`` follows the list's cursor, ``events`` pages through the log, and
``export`` resumes a cut NDJSON stream after its last whole line."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from jobfeed_client import Client, RetryPolicy
from tests.client.proxy import Proxy
from tests.procs import ServerProcess

pytestmark = pytest.mark.process


def test_jobs_and_events_follow_their_cursors(shared_server: ServerProcess) -> None:
    """Pages of 2 jobs and of 1,000 events are followed to the end (or to ``limit``)."""
    kind = f"reads-{uuid.uuid4().hex[:6]}"
    with Client(shared_server.url) as client:
        ids = [client.create_job(kind=kind).job_id for _ in range(5)]
        assert [s.job_id for s in client.jobs(kind=kind, page_size=2)] == ids[::-1]
        assert [s.job_id for s in client.jobs(kind=kind, page_size=2, limit=3)] == ids[:1:-1]
        body = [{"type": "log", "message": str(i)} for i in range(1, 1200)]
        for start in range(0, len(body), 500):
            client.append(ids[0], *body[start : start + 500])
        assert [e.seq for e in client.events(ids[0], after=5)] == list(range(6, 1201))


def test_export_resumes_after_a_cut_without_repeating_a_line(
    shared_server: ServerProcess, proxy_to: Callable[[ServerProcess], Proxy]
) -> None:
    """The connection is cut after the first line (megabytes still to come): the export
    reconnects from the last seq it yielded, and every event comes out once, in order."""
    proxy = proxy_to(shared_server)
    job_id = f"export-{uuid.uuid4().hex[:6]}"
    big = "x" * 4000
    with Client(shared_server.url) as direct:
        direct.create_job(job_id)
        for _ in range(10):
            direct.append(job_id, *[{"type": "log", "message": big}] * 200)
    with Client(proxy.url, retry=RetryPolicy(base=0.02, cap=0.2)) as client:
        lines = client.export(job_id)
        seqs = [int(next(lines).split(b'"seq":', 1)[1].split(b",", 1)[0])]
        assert proxy.cut() >= 1
        for line in lines:
            seqs.append(int(line.split(b'"seq":', 1)[1].split(b",", 1)[0]))
    assert seqs == list(range(1, 2002))
    assert proxy.accepted >= 2  # it did reconnect


def test_create_job_with_a_heartbeat_timeout(shared_server: ServerProcess) -> None:
    """``create_job(heartbeat_timeout=...)`` sends it: the snapshot (and its fold from the
    log) carries it; without it, null."""
    job_id = f"watched-{uuid.uuid4().hex[:6]}"
    with Client(shared_server.url) as client:
        assert client.create_job(job_id, heartbeat_timeout=600).heartbeat_timeout == 600
        assert client.get_job(job_id).heartbeat_timeout == 600
        assert client.create_job().heartbeat_timeout is None
