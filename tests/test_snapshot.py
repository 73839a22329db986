"""The snapshot reducer, ``server.snapshot.apply_event``, and the guarantee built on it.

Unit tests pin what each event type does to a snapshot. The property tests pin the protocol's
"the snapshot is always consistent with the log up to last_seq": for random valid sequences
of events appended through the real app, ``GET /v1/jobs/{id}`` equals the fold of
``apply_event`` over ``GET /v1/jobs/{id}/events``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import snapshot
from server.snapshot import JobState, apply_event
from tests.conftest import create_job
from tests.test_api_jobs import read_log

Client = TestClient[Any, Any]

T0 = "2026-11-23T10:00:00.000000Z"
T1 = "2026-11-23T10:00:01.000000Z"
T2 = "2026-11-23T10:00:02.000000Z"


def created(**fields: Any) -> dict[str, Any]:
    return {"job_id": "j", "seq": 1, "id": 1, "type": "created", "ts": T0, **fields}


def stored(seq: int, event_type: str, ts: str = T1, **fields: Any) -> dict[str, Any]:
    return {"job_id": "j", "seq": seq, "id": 100 + seq, "type": event_type, "ts": ts, **fields}


def fold(events: list[dict[str, Any]]) -> JobState:
    """reduce(apply_event, events): the snapshot a log implies."""
    state: JobState | None = None
    for event in events:
        state = apply_event(state, event)
    assert state is not None
    return state


@pytest.fixture
def queued() -> JobState:
    return apply_event(None, created(kind="k", metadata={"team": 1}))


@pytest.fixture
def running(queued: JobState) -> JobState:
    event = stored(2, "progress", progress=40.0, phase="p", message="m", current=4, total=10)
    return apply_event(queued, event)


# -- unit tests of apply_event -----------------------------------------------------------------


def test_created_makes_a_queued_job(queued: JobState) -> None:
    """``created`` starts a queued snapshot: kind, metadata, last_seq 1, both times = ts."""
    assert queued.job_id == "j"
    assert queued.status == "queued"
    assert queued.kind == "k"
    assert queued.metadata == {"team": 1}
    assert queued.last_seq == 1
    assert queued.created_at == queued.updated_at == T0
    assert queued.finished_at is None
    assert not queued.finished
    # The created event's id, then its ts in microseconds since 1970 in hex.
    assert queued.epoch == f"1-{1795428000 * 10**6:x}"


def test_epoch_depends_on_created_id_and_ts() -> None:
    """Another created id, or the same id at another time (a re-created job, a wiped
    database), gives another epoch; later events never change it."""
    first = apply_event(None, created())
    assert apply_event(None, created(id=2)).epoch != first.epoch
    assert apply_event(None, created(ts=T1)).epoch != first.epoch
    assert apply_event(None, created(ts="2026-11-23T10:00:00.000001Z")).epoch == (
        f"1-{1795428000 * 10**6 + 1:x}"
    )
    assert apply_event(first, stored(2, "log", message="m")).epoch == first.epoch


def test_snapshot_stored_before_epochs_still_loads() -> None:
    """JSON without ``epoch`` (stored before migration 0003) loads with epoch None."""
    old = apply_event(None, created()).to_dict()
    del old["epoch"]
    assert JobState.from_json(orjson.dumps(old)).epoch is None


def test_created_without_kind_or_metadata() -> None:
    """A ``created`` event without kind/metadata gives kind and metadata null."""
    state = apply_event(None, created())
    assert state.kind is None
    assert state.metadata is None


def test_event_before_created_is_an_error() -> None:
    """Any event other than ``created`` needs a snapshot to apply to."""
    with pytest.raises(ValueError, match="before the job's created event"):
        apply_event(None, stored(1, "log", message="m", level="info"))


def test_progress_sets_running_and_its_fields(running: JobState) -> None:
    """progress: status running, progress/phase/message/current/total copied, last_seq and
    updated_at moved, created_at kept."""
    assert running.status == "running"
    assert (running.progress, running.phase, running.message) == (40.0, "p", "m")
    assert (running.current, running.total) == (4, 10)
    assert running.last_seq == 2
    assert running.updated_at == T1
    assert running.created_at == T0


def test_progress_changes_only_the_fields_it_names(running: JobState) -> None:
    """A progress event leaves the snapshot fields it does not carry as they were."""
    state = apply_event(running, stored(3, "progress", T2, phase="q"))
    assert state.phase == "q"
    assert (state.progress, state.message, state.current, state.total) == (40.0, "m", 4, 10)


def test_progress_data_is_not_in_the_snapshot(queued: JobState) -> None:
    """progress ``data`` is kept in the event only; the snapshot has no place for it."""
    state = apply_event(queued, stored(2, "progress", data={"x": 1}))
    assert "x" not in str(state.to_dict())
    assert state.status == "running"


def test_log_sets_running_and_nothing_else(queued: JobState) -> None:
    """log: status running; message, progress and the rest untouched."""
    state = apply_event(queued, stored(2, "log", message="hello", level="info"))
    assert state.status == "running"
    assert state.message is None
    assert state.progress is None
    assert state.last_seq == 2


def test_completed_sets_progress_100_result_and_finished_at(running: JobState) -> None:
    """completed: status completed, progress 100, result, message, finished_at = ts."""
    state = apply_event(running, stored(3, "completed", T2, result={"n": 1}, message="done"))
    assert state.status == "completed"
    assert state.progress == 100
    assert state.result == {"n": 1}
    assert state.message == "done"
    assert state.finished_at == T2
    assert state.updated_at == T2
    assert state.finished


def test_completed_without_result_has_null_result(running: JobState) -> None:
    """completed without a result leaves result null and keeps the last message."""
    state = apply_event(running, stored(3, "completed"))
    assert state.result is None
    assert state.message == "m"


def test_failed_sets_error_and_finished_at(running: JobState) -> None:
    """failed: status failed, error stored, finished_at set, progress kept where it was."""
    error = {"message": "boom", "code": "E"}
    state = apply_event(running, stored(3, "failed", T2, error=error))
    assert state.status == "failed"
    assert state.error == error
    assert state.finished_at == T2
    assert state.progress == 40.0
    assert state.finished


def test_cancelled_sets_finished_at_and_reason_as_message(running: JobState) -> None:
    """cancelled: status cancelled, finished_at set; a reason becomes the message."""
    state = apply_event(running, stored(3, "cancelled", T2, reason="user"))
    assert state.status == "cancelled"
    assert state.finished_at == T2
    assert state.message == "user"
    assert state.finished


def test_cancelled_without_reason_keeps_message(running: JobState) -> None:
    """cancelled without a reason keeps the last message."""
    assert apply_event(running, stored(3, "cancelled")).message == "m"


@pytest.mark.parametrize("event_type", ["notification", "stage_completed"])
def test_custom_event_moves_only_last_seq_and_updated_at(queued: JobState, event_type: str) -> None:
    """A custom event changes neither status nor progress fields; last_seq, updated_at move
    (and started_at, set by the first event after created, whatever its type)."""
    state = apply_event(queued, stored(2, event_type, T2, message="m", data={"a": 1}))
    assert dataclasses.replace(queued, last_seq=2, updated_at=T2, started_at=T2) == state


def test_apply_event_does_not_change_its_input(running: JobState) -> None:
    """apply_event returns a new snapshot; the one it was given is unchanged."""
    before = running.to_dict()
    apply_event(running, stored(3, "completed", result=1))
    assert running.to_dict() == before


def test_snapshot_has_the_fixed_shape(running: JobState) -> None:
    """to_dict always has the protocol's 21 fields, null where there is no value."""
    assert list(running.to_dict()) == [
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
    ]
    assert running.to_dict()["finished_at"] is None


def test_snapshot_json_round_trips(running: JobState) -> None:
    """from_json(to_json(s)) == s, as the writer reloads snapshots from SQLite."""
    finished = apply_event(running, stored(3, "failed", error={"message": "x", "details": [1]}))
    assert JobState.from_json(finished.to_json()) == finished


# -- property: the fold over random logs -------------------------------------------------------

texts = st.text(max_size=12)
small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def progress_events(draw: st.DrawFn) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "progress"}
    if draw(st.booleans()):
        event["progress"] = draw(st.floats(0, 100) | st.integers(0, 100))
    for name in ("phase", "message"):
        if draw(st.booleans()):
            event[name] = draw(texts)
    if draw(st.booleans()):
        event["total"] = draw(st.integers(0, 10**6))
        if draw(st.booleans()):
            event["current"] = draw(st.integers(0, event["total"]))
    elif draw(st.booleans()):
        event["current"] = draw(st.integers(0, 10**6))
    if draw(st.booleans()):
        event["data"] = draw(st.dictionaries(texts, small_json, max_size=2))
    if len(event) == 1:
        event["phase"] = draw(texts)
    return event


log_events = st.fixed_dictionaries(
    {"type": st.just("log"), "message": texts},
    optional={"level": st.sampled_from(["debug", "info", "warning", "error"])},
)
custom_events = st.fixed_dictionaries(
    {"type": st.sampled_from(["notification", "stage_completed", "step.done"])},
    optional={"message": texts, "data": st.dictionaries(texts, small_json, max_size=2)},
)
terminal_events = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("completed")}, optional={"result": small_json, "message": texts}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("failed"),
            "error": st.fixed_dictionaries(
                {"message": texts}, optional={"code": texts, "details": small_json}
            ),
        }
    ),
    st.fixed_dictionaries({"type": st.just("cancelled")}, optional={"reason": texts}),
)


@st.composite
def job_histories(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    """Valid appends for one job: open events, maybe a terminal one at the end, cut into
    batches; some events keyed, and some keyed batches sent again (a producer's retry)."""
    events = draw(st.lists(progress_events() | log_events | custom_events, max_size=10))
    if draw(st.booleans()):
        events.append(draw(terminal_events))
    for index, event in enumerate(events):
        if draw(st.booleans()):
            event["key"] = f"k{index}"
    batches: list[list[dict[str, Any]]] = []
    start = 0
    while start < len(events):
        size = draw(st.integers(1, 4))
        batches.append(events[start : start + size])
        start += size
    sent: list[list[dict[str, Any]]] = []
    for batch in batches:
        sent.append(batch)
        if all("key" in event for event in batch) and draw(st.booleans()):
            sent.append(batch)  # a retry: every event a duplicate
    return sent


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=job_histories())
async def test_stored_snapshot_is_the_fold_of_the_stored_log(
    client: Client, history: list[list[dict[str, Any]]]
) -> None:
    """For any valid sequence of appends (batches, keys, retries, an optional terminal event),
    GET /v1/jobs/{id} equals reduce(apply_event, GET /v1/jobs/{id}/events). A batch whose
    current/total contradict the job's (current > total across events) is refused whole."""
    job_id = (await create_job(client, metadata={"n": len(history)}))["job_id"]
    expected_len = 1
    for batch in history:
        body = batch[0] if len(batch) == 1 else {"events": batch}
        response = await client.post(f"/v1/jobs/{job_id}/events", json=body)
        if response.status == 422:
            details = (await response.json())["error"]["details"]
            assert [d["type"] for d in details] == ["current_over_total"]
            continue
        assert response.status in (200, 201), await response.text()
        if response.status == 201:
            expected_len += len(batch)
    log = await read_log(client, job_id)
    assert len(log) == expected_len
    snapshot = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert fold(log).to_dict() == snapshot


@st.composite
def stored_logs(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A log as the writer stores it: created, open events, maybe a terminal one."""
    body: list[dict[str, Any]] = draw(
        st.lists(progress_events() | log_events | custom_events, max_size=12)
    )
    if draw(st.booleans()):
        body.append(draw(terminal_events))
    log = [created(metadata=draw(st.dictionaries(texts, small_json, max_size=2)))]
    for seq, event in enumerate(body, start=2):
        ts = f"2026-11-23T10:00:{seq:02}.000000Z"
        log.append(
            stored(seq, event["type"], ts, **{k: v for k, v in event.items() if k != "type"})
        )
    return log


_STATUS_OF = {"progress": "running", "log": "running", "completed": "completed",
              "failed": "failed", "cancelled": "cancelled"}  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(log=stored_logs())
def test_fold_tracks_status_last_seq_and_times(log: list[dict[str, Any]]) -> None:
    """Folding any stored log: last_seq and updated_at are the last event's; status is that of
    the last status-changing event (queued if none); finished iff the log ends terminal."""
    state = fold(log)
    assert state.last_seq == log[-1]["seq"]
    assert state.updated_at == log[-1]["ts"]
    assert state.created_at == log[0]["ts"]
    statuses = [_STATUS_OF[e["type"]] for e in log if e["type"] in _STATUS_OF]
    assert state.status == (statuses[-1] if statuses else "queued")
    assert state.finished == (log[-1]["type"] in ("completed", "failed", "cancelled"))
    assert (state.finished_at == log[-1]["ts"]) == state.finished
    assert JobState.from_json(state.to_json()) == state


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(JobState)])
def test_evolve_is_replace(name: str) -> None:
    """The reducer's fast copy changes exactly the named field, as dataclasses.replace does."""
    state = JobState("job", "kind", "running", 5, "t0", "t1", {"a": 1}, 1.0, "p", "m", 1, 7)
    changes: dict[str, Any] = {name: f"new {name}"}
    evolved = snapshot._evolve(state, changes)
    assert evolved == dataclasses.replace(state, **changes)
    assert getattr(evolved, name) == f"new {name}"
    assert state.status == "running"  # the original is untouched


_fold_values = st.none() | st.integers(0, 10) | st.floats(0, 100) | st.text(max_size=3)
# A stored progress event's fields as the writer stores them (validated: numbers are numbers).
_progress_fields = {
    "progress": st.floats(0, 100),
    "phase": st.text(max_size=3),
    "message": st.text(max_size=3),
    "current": st.integers(0, 10),
    "total": st.integers(10, 20),
}
_stored_bodies = st.one_of(
    st.fixed_dictionaries({"type": st.just("progress")}, optional=_progress_fields),
    st.fixed_dictionaries({"type": st.just("log"), "message": st.text(max_size=3)}),
    st.fixed_dictionaries(
        {"type": st.just("completed")},
        optional={"result": _fold_values, "message": st.text(max_size=3)},
    ),
    st.fixed_dictionaries({"type": st.just("failed"), "error": st.just({"message": "m"})}),
    st.fixed_dictionaries({"type": st.just("cancelled")}, optional={"reason": st.text(max_size=3)}),
    st.fixed_dictionaries({"type": st.just("note")}, optional={"data": st.just({"a": 1})}),
)


@settings(max_examples=300, deadline=None)
@given(bodies=st.lists(_stored_bodies, max_size=8))
def test_fold_is_apply_event_one_by_one(bodies: list[dict[str, Any]]) -> None:
    """The writer's Fold (one JobState per request) gives the state that apply_event gives
    event by event, and answers the same status, last_seq, current and total on the way."""
    created = {"job_id": "j", "seq": 1, "id": 1, "type": "created", "ts": "2026-01-01T00:00:00Z"}
    state = apply_event(None, {**created, "kind": "k"})
    fold = snapshot.Fold(state)
    for seq, body in enumerate(bodies, start=2):
        # Two events a second: one commit's events share a ts (the rate window's dt = 0).
        event = {"job_id": "j", "seq": seq, "id": seq, "ts": f"2026-01-01T00:00:{seq // 2:02d}Z"}
        event.update(body)
        state = apply_event(state, event)
        fold.apply(event)
        assert (fold.status, fold.finished, fold.last_seq) == (
            state.status,
            state.finished,
            state.last_seq,
        )
        assert (fold.current, fold.total, fold.kind) == (state.current, state.total, state.kind)
    assert fold.result() == state
