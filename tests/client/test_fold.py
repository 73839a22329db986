"""The client's fold (``Snapshot.apply``) is the server's: for arbitrary logs written to a
real server, folding the events the client reads (a page walk and a live watch, over both
transports) gives exactly the snapshot the server stores and the one its own reducer computes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobfeed_client import Client, InvalidRequest, Snapshot
from server.snapshot import JobState, apply_event
from tests.procs import ServerProcess

pytestmark = pytest.mark.process

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
json_leaf = st.none() | st.booleans() | st.integers(-1000, 1000) | text
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
data_object = st.dictionaries(text, json_value, max_size=3)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


progress = st.fixed_dictionaries(
    {"type": st.just("progress")},
    optional={
        "progress": st.floats(0, 100),
        "phase": text,
        "message": text,
        "current": st.integers(0, 30),
        "total": st.integers(0, 30),
        "data": data_object,
    },
).filter(lambda e: len(e) > 1)
log = st.fixed_dictionaries(
    {"type": st.just("log"), "message": text},
    optional={"level": st.sampled_from(["debug", "info", "warning", "error"])},
)
custom = st.fixed_dictionaries(
    {"type": st.sampled_from(["artifact.uploaded", "step_done", "note"])},
    optional={"message": text, "data": data_object},
)
terminal = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("completed")}, optional={"result": json_value, "message": text}
    ),
    st.fixed_dictionaries(
        {"type": st.just("failed"), "error": st.fixed_dictionaries({"message": text})}
    ),
    st.fixed_dictionaries({"type": st.just("cancelled")}, optional={"reason": text}),
)
logs = st.tuples(
    st.lists(st.one_of(progress, progress, log, custom), max_size=12),
    optional(terminal),
    optional(text.filter(bool)),
    optional(data_object),
)


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess) -> Iterator[Client]:
    with Client(shared_server.url, flush_interval=0) as sdk:
        yield sdk


def server_fold(raw_events: list[dict[str, Any]]) -> dict[str, Any]:
    state: JobState | None = None
    for raw in raw_events:
        state = apply_event(state, raw)
    assert state is not None
    return state.to_dict()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs)
def test_client_fold_equals_the_servers_snapshot(client: Client, log: Any) -> None:
    """Whatever was appended (events the server refuses, e.g. counts past the total, are
    left out), the client's fold of the log is the stored snapshot, field for field."""
    body, end, kind, metadata = log
    job_id = f"fold-{uuid.uuid4().hex[:12]}"
    client.create_job(job_id, kind=kind, metadata=metadata)
    for event in [*body, *([end] if end else [])]:
        # An event the server refuses (e.g. current over the job's total) is not stored.
        with contextlib.suppress(InvalidRequest):
            client.append(job_id, event)
    stored = client.get_job(job_id)
    events = list(client.events(job_id))
    assert Snapshot.fold(events) == stored
    assert stored.to_dict() == server_fold([e.raw for e in events])
    if stored.finished:  # a live watch ends only at the terminal event
        for transport in ("websocket", "sse"):
            watch = client.watch(job_id, transport=transport)
            assert [e.seq for e in watch] == [e.seq for e in events]
            assert watch.snapshot == stored


def test_watch_from_a_snapshot_keeps_it_current(client: Client) -> None:
    """Starting from ``get_job``'s snapshot, the watcher resumes at its last_seq, with its
    epoch, and folds what follows into it."""
    job_id = f"fold-{uuid.uuid4().hex[:12]}"
    client.create_job(job_id, kind="k")
    client.append(job_id, {"type": "progress", "current": 1, "total": 4, "phase": "a"})
    start = client.get_job(job_id)
    client.append(job_id, {"type": "progress", "current": 3}, {"type": "completed", "result": 7})
    watch = client.watch(job_id, snapshot=start)
    assert [e.seq for e in watch] == [3, 4]
    assert watch.snapshot == client.get_job(job_id)
    assert watch.epoch == start.epoch


def test_the_client_fold_reproduces_the_server_vectors() -> None:
    """``Snapshot.apply`` on every case of server.fold_vectors (stalls, resets, commits of
    many events at one ts, fractions, microsecond gaps) gives the server's snapshot after
    every event, rate and eta_seconds to the last bit; and folding on from any of the
    server's snapshots (``Snapshot.from_dict``, as a watch given a snapshot does) reaches the
    same last snapshot."""
    from jobfeed_client.events import Event
    from server.fold_vectors import vectors

    for case in vectors()["cases"]:
        events = [Event.from_dict(raw) for raw in case["events"]]
        state: Snapshot | None = None
        for event, expected in zip(events, case["snapshots"], strict=True):
            state = Snapshot.apply(state, event)
            assert state.to_dict() == expected, case["name"]
        for index, given_snapshot in enumerate(case["snapshots"]):
            resumed = Snapshot.from_dict(given_snapshot)
            for event in events[index + 1 :]:
                resumed = Snapshot.apply(resumed, event)
            assert resumed.to_dict() == case["snapshots"][-1], case["name"]
