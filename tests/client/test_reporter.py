"""The reporter (``client.job``) against a real server process: how a block finishes a job,
the progress forms, keys that make retries safe, the flush interval, and the buffer's policy
when the server is away (through a proxy the test controls)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobfeed_client import (
    AsyncClient,
    BufferFull,
    Client,
    FlushTimeout,
    JobFinished,
    ReporterError,
    RetryPolicy,
)
from server.snapshot import JobState, apply_event
from tests.client.proxy import Proxy
from tests.client.test_outbox import calls, server_states
from tests.procs import Launcher, ServerProcess

pytestmark = pytest.mark.process

FAST_RETRY = RetryPolicy(base=0.02, cap=0.2)
JOIN_TIMEOUT = 60.0


def new_id() -> str:
    return f"rep-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(shared_server: ServerProcess) -> Iterator[Client]:
    with Client(shared_server.url, retry=FAST_RETRY) as sdk:
        yield sdk


@pytest.fixture(params=[True, False], ids=["ingest", "http"])
def proxied(
    request: pytest.FixtureRequest,
    shared_server: ServerProcess,
    proxy_to: Callable[[ServerProcess], Proxy],
) -> Iterator[tuple[Client, Proxy]]:
    """A client whose only way to the server is a proxy the test controls; its reporters
    send over the producer stream (``ingest``) or over HTTP."""
    proxy = proxy_to(shared_server)
    with Client(proxy.url, retry=FAST_RETRY, flush_interval=0, ingest=request.param) as sdk:
        yield sdk, proxy


def types_and_messages(client: Client, job_id: str) -> list[tuple[str, Any]]:
    return [(e.type, e.message) for e in client.events(job_id)]


def test_leaving_the_block_completes_the_job(client: Client) -> None:
    """The README's five lines: progress, a log line, a custom event, then ``completed``."""
    job_id = new_id()
    with client.job(job_id, kind="build") as job:
        job.progress(3, 7, phase="match")
        job.log("matched 3 of 7")
        job.event("artifact.uploaded", data={"path": "out.tar"})
    assert [e.type for e in client.events(job_id)] == [
        "created",
        "progress",
        "log",
        "artifact.uploaded",
        "completed",
    ]
    snapshot = client.get_job(job_id)
    assert (snapshot.status, snapshot.kind, snapshot.phase) == ("completed", "build", "match")
    assert (snapshot.current, snapshot.total, snapshot.progress) == (3, 7, 100.0)
    assert job.created is True


def test_an_exception_fails_the_job_and_is_reraised(client: Client) -> None:
    """The block's exception becomes the ``failed`` event's error, then propagates."""
    job_id = new_id()

    def divide() -> None:
        with client.job(job_id) as job:
            job.log("about to divide")
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        divide()
    snapshot = client.get_job(job_id)
    assert snapshot.status == "failed"
    assert snapshot.error == {"message": "division by zero", "code": "ZeroDivisionError"}


async def test_async_twin_cancelled_task_cancels_the_job(shared_server: ServerProcess) -> None:
    """``AsyncClient.job`` has the same names; a cancelled task appends ``cancelled``."""
    job_id = new_id()
    started = asyncio.Event()
    async with AsyncClient(shared_server.url, retry=FAST_RETRY) as client:

        async def work() -> None:
            async with client.job(job_id, kind="async") as job:
                await job.progress(fraction=0.25, phase="warm-up")
                await job.flush()
                started.set()
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(work())
        await asyncio.wait_for(started.wait(), JOIN_TIMEOUT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        snapshot = await client.get_job(job_id)
        assert snapshot.status == "cancelled"
        assert snapshot.message == "interrupted (CancelledError)"
        assert [e.progress async for e in client.events(job_id) if e.type == "progress"] == [25.0]


def test_progress_forms_are_explicit(client: Client) -> None:
    """Counts, ``percent=`` and ``fraction=`` each mean what they say; a float where a count
    goes, two forms at once, or a value out of range is refused before anything is sent."""
    job_id = new_id()
    with client.job(job_id) as job:
        job.progress(percent=40)
        job.flush()
        assert client.get_job(job_id).progress == 40.0
        job.progress(fraction=0.5)
        job.flush()
        assert client.get_job(job_id).progress == 50.0
        job.progress(2, 8)
        job.flush()
        assert client.get_job(job_id).progress == 25.0
        with pytest.raises(TypeError):
            job.progress(0.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="one of"):
            job.progress(3, 7, percent=40)
        with pytest.raises(ValueError, match="fraction"):
            job.progress(fraction=1.5)
        with pytest.raises(ValueError, match="percent"):
            job.progress(percent=101)
        with pytest.raises(ValueError, match="exceeds"):
            job.progress(9)  # the total reported so far is 8
    assert [e.type for e in client.events(job_id)].count("progress") == 3


def test_updates_within_a_flush_interval_coalesce(shared_server: ServerProcess) -> None:
    """With a flush interval longer than the test, 200 updates cost at most two events
    (the first batch may go before the rest arrive); the log line between them is kept,
    and the job ends where the last update left it."""
    job_id = new_id()
    with Client(shared_server.url, flush_interval=3600) as client:
        with client.job(job_id) as job:
            for i in range(1, 101):
                job.progress(i, 200, message=f"item {i}")
            job.log("half way")
            for i in range(101, 201):
                job.progress(i, 200, message=f"item {i}")
        events = list(client.events(job_id))
        assert [e.message for e in events if e.type == "log"] == ["half way"]
        assert sum(e.type == "progress" for e in events) <= 4
        assert job.stats.merged >= 196
        snapshot = client.get_job(job_id)
        assert (snapshot.current, snapshot.message) == (200, "item 200")


def test_same_run_key_rerun_appends_nothing_twice(client: Client) -> None:
    """Every event is keyed; re-running the same calls with the same ``run_key`` (a worker
    restarted from the top) finds every event already there."""
    job_id = new_id()

    def run() -> Any:
        with client.job(job_id, run_key="attempt-1") as job:
            for i in range(5):
                job.log(f"step {i}")
                job.event("step.done", data={"i": i})
        return job

    first = run()
    log_before = types_and_messages(client, job_id)
    second = run()
    assert second.created is False
    assert types_and_messages(client, job_id) == log_before
    assert second.stats.duplicates == second.stats.events == first.stats.events


def test_lost_answers_are_retried_without_duplicates(proxied: tuple[Client, Proxy]) -> None:
    """The server commits, the answer is lost on the way back: the reporter resends the same
    batch with the same keys, and the server answers it as a duplicate."""
    client, proxy = proxied
    job_id = new_id()
    with client.job(job_id) as job:
        job.flush()  # the job exists
        proxy.set(swallow_answers=True)
        job.log("a")
        job.log("b")
        proxy.wait_for(lambda p: p.swallowed >= 2)
        proxy.set(swallow_answers=False)
        job.flush()
    messages = [e.message for e in client.events(job_id) if e.type == "log"]
    assert messages == ["a", "b"]
    assert job.stats.duplicates >= 1  # the batch whose answers were lost, resent as it was
    # HTTP: each of the two batches lost its answer; the stream: the connection that lost
    # the first answer dropped, and the batch was sent again on a new one.
    assert job.stats.retries >= (1 if client._async.ingest else 2)


def test_full_buffer_raises_when_asked_to(shared_server: ServerProcess, proxy_to: Any) -> None:
    """``when_full="raise"``: with the server away, the call past ``max_buffered`` raises
    ``BufferFull`` and is not added; what was buffered is delivered once the server is back,
    and the terminal event always has room."""
    proxy = proxy_to(shared_server)
    job_id = new_id()
    with Client(proxy.url, retry=FAST_RETRY, max_buffered=3, when_full="raise") as client:
        proxy.set(refusing=True)
        with client.job(job_id) as job:
            for i in range(3):
                job.log(f"kept {i}")
            with pytest.raises(BufferFull) as full:
                job.log("refused")
            assert full.value.unsent == 3
            proxy.set(refusing=False)
        messages = [(e.type, e.message) for e in client.events(job_id)][1:]
        assert messages == [
            ("log", "kept 0"),
            ("log", "kept 1"),
            ("log", "kept 2"),
            ("completed", None),
        ]


def test_full_buffer_blocks_until_the_server_is_back(
    shared_server: ServerProcess, proxy_to: Any
) -> None:
    """``when_full="block"`` (the default): the call past ``max_buffered`` waits while the
    reporter retries, and returns once the server acknowledges; nothing is lost."""
    proxy = proxy_to(shared_server)
    job_id = new_id()
    reported = threading.Event()
    errors: list[BaseException] = []
    with Client(proxy.url, retry=FAST_RETRY, max_buffered=2) as client:
        proxy.set(refusing=True)

        def worker() -> None:
            try:
                with client.job(job_id) as job:
                    for i in range(4):
                        job.log(f"line {i}")
                    reported.set()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        proxy.wait_for(lambda p: p.refused >= 3)  # the reporter is retrying meanwhile
        assert not reported.is_set()  # the third call is still waiting for room
        proxy.set(refusing=False)
        thread.join(JOIN_TIMEOUT)
        assert not thread.is_alive()
        assert not errors
        messages = [e.message for e in client.events(job_id) if e.type == "log"]
        assert messages == [f"line {i}" for i in range(4)]


def test_flush_timeout_says_how_many_are_unsent(
    shared_server: ServerProcess, proxy_to: Any
) -> None:
    """Leaving the block with the server away raises ``FlushTimeout`` after
    ``close_timeout``, counting what is still buffered, instead of waiting forever."""
    proxy = proxy_to(shared_server)
    with Client(proxy.url, retry=FAST_RETRY, close_timeout=0.5) as client:
        proxy.set(refusing=True)
        with pytest.raises(FlushTimeout) as timeout, client.job(new_id()) as job:
            job.log("never delivered")
        assert timeout.value.unsent == 2  # the log line and the completed event


def test_a_refusal_stops_the_reporter_loudly(client: Client) -> None:
    """A job finished by someone else refuses new events (409): the reporter raises
    ``ReporterError`` from ``JobFinished`` with the undelivered count, never dropping them
    silently."""
    job_id = new_id()
    client.create_job(job_id)
    client.append(job_id, {"type": "cancelled", "reason": "by an operator"})
    with pytest.raises(ReporterError) as error, client.job(job_id) as job:
        job.log("too late")
    assert isinstance(error.value.__cause__, JobFinished)
    assert error.value.unsent == 2


def test_a_forked_child_gets_its_own_loop_and_pool(client: Client) -> None:
    """A client used before a fork (a Celery prefork worker's parent) works in the child:
    the child starts its own loop thread and connection pool."""
    job_id = new_id()
    client.create_job(job_id)  # the parent's loop thread and pool exist now
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_report_in_child, args=(client, job_id))
    child.start()
    child.join(JOIN_TIMEOUT)
    assert child.exitcode == 0
    assert [e.message for e in client.events(job_id) if e.type == "log"] == ["from the child"]


def _report_in_child(client: Client, job_id: str) -> None:
    with client.job(job_id) as job:
        job.log("from the child")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=calls(), flush_interval=st.sampled_from([0.0, 0.01, 3600.0]))
def test_reported_calls_leave_the_snapshot_sending_each_would(
    shared_server: ServerProcess, script: list[tuple[Any, ...]], flush_interval: float
) -> None:
    """End to end, whatever the flush interval and the flush points: every log line and
    custom event is stored once in order, and the job ends in the state it would have
    reached had each progress update been sent on its own (the server's own reducer)."""
    job_id = new_id()
    expected: list[dict[str, Any]] = []
    with Client(shared_server.url, flush_interval=flush_interval) as client:
        with client.job(job_id) as job:
            for call in script:
                if call[0] == "progress":
                    fields = dict(call[1])
                    expected.append({"type": "progress", **fields})
                    job.progress(
                        fields.pop("current", None),
                        fields.pop("total", None),
                        percent=fields.pop("progress", None),
                        **fields,
                    )
                elif call[0] == "event" and call[1]["type"] == "log":
                    expected.append({"type": "log", "message": "m", "level": "info"})
                    job.log("m")
                elif call[0] == "event" and call[1]["type"] != "completed":
                    expected.append({"type": "step.done"})
                    job.event("step.done")
                elif call[0] == "take":
                    job.flush()
        expected.append({"type": "completed"})
        events = list(client.events(job_id))
        snapshot = client.get_job(job_id).to_dict()
    stored_others = [e.type for e in events if e.type not in ("progress", "created")]
    assert stored_others == [b["type"] for b in expected if b["type"] != "progress"]

    def comparable(view: dict[str, Any]) -> dict[str, Any]:
        moving = ("last_seq", "updated_at", "created_at", "finished_at", "epoch", "job_id")
        # Times again (started_at), and the rate estimate, which is made from the samples
        # the server gets: merged updates are fewer samples (docs/protocol.md, "Rate and ETA").
        estimate = ("started_at", "rate", "eta_seconds", "rate_window")
        return {k: v for k, v in view.items() if k not in moving and k not in estimate}

    # The job's state at every kept event, and at the end, is the oracle's.
    state: JobState | None = None
    at_kept_events = []
    for event in events:
        state = apply_event(state, event.raw)
        if event.type not in ("progress", "created"):
            at_kept_events.append(comparable(state.to_dict()))
    oracle = [comparable(view) for kind, view in server_states(expected) if kind != "progress"]
    assert at_kept_events == oracle
    assert comparable(snapshot) == oracle[-1]


async def test_rate_limited_appends_are_retried(launcher: Launcher) -> None:
    """A server that throttles (429 with Retry-After) slows the reporter down; every event
    still arrives once, in order."""
    server = await launcher.start(limits__rate_per_client=4, limits__rate_burst=1)
    job_id = new_id()
    # Over HTTP: the rate limit counts requests, and a producer stream is one (its upgrade).
    async with AsyncClient(server.url, retry=FAST_RETRY, flush_interval=0, ingest=False) as client:
        async with client.job(job_id) as job:
            for i in range(3):
                await job.log(f"line {i}")
                await job.flush()
        assert job.stats.retries >= 1
        messages = [e.message async for e in client.events(job_id) if e.type == "log"]
    assert messages == [f"line {i}" for i in range(3)]


def test_names_are_checked_at_the_call(client: Client) -> None:
    """A job id or custom type the server would refuse fails where it is written, instead of
    stopping the reporter later."""
    with pytest.raises(ValueError, match="job_id"):
        client.job("no spaces allowed")
    job_id = new_id()
    with client.job(job_id) as job:
        for bad in ("Upper", "progress", "error", "x" * 65, "1st"):
            with pytest.raises(ValueError, match="custom event type"):
                job.event(bad)
        job.event("ok.name_1-2")
    assert [e.type for e in client.events(job_id)][1:] == ["ok.name_1-2", "completed"]


def test_a_full_buffer_is_sent_without_waiting_the_interval(shared_server: ServerProcess) -> None:
    """With a flush interval longer than the test, a producer that fills the buffer is not
    held back by it: a whole batch ready, or a full buffer, is sent at once."""
    job_id = new_id()
    done = threading.Event()

    def produce() -> None:
        with (
            Client(shared_server.url, flush_interval=3600, max_buffered=600) as client,
            client.job(job_id) as job,
        ):
            for i in range(1500):
                job.log(f"line {i}")
            done.set()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    assert done.wait(JOIN_TIMEOUT), "the producer was held back by the flush interval"
    thread.join(JOIN_TIMEOUT)
    with Client(shared_server.url) as client:
        assert sum(e.type == "log" for e in client.events(job_id)) == 1500
