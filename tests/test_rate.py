"""Rate and ETA in the snapshot (``server.snapshot``, "Rate and ETA"; docs/protocol.md).

Unit tests pin each rule of the estimator; the property test folds arbitrary progress
histories (monotone, stalled, reset, total changing, fractions only, many events at one ts)
and checks that the estimate is never negative, never NaN or infinite, null when unknown,
and survives the snapshot's JSON round trip (the writer reloads it from SQLite). That the
stored snapshot equals the fold of the stored log, new fields included, is
tests/test_snapshot.py's property test through the real app.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from server.migrate import apply_migrations, bundled_migrations
from server.snapshot import (
    MAX_ETA_SECONDS,
    MIN_RATE_SECONDS,
    RATE_WINDOW_SECONDS,
    JobState,
    apply_event,
)
from tests.conftest import ClientFactory, ConfigFactory, append
from tests.test_api_jobs import read_log

START = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    """The ts ``seconds`` after START, as the writer writes it."""
    moment = START + timedelta(microseconds=round(seconds * 1_000_000))
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Log:
    """A job's log built event by event, folded as it grows."""

    def __init__(self) -> None:
        self.seq = 1
        self.state = apply_event(
            None, {"job_id": "j", "seq": 1, "id": 1, "type": "created", "ts": at(0)}
        )

    def add(self, seconds: float, event_type: str = "progress", **fields: Any) -> JobState:
        self.seq += 1
        event = {"job_id": "j", "seq": self.seq, "id": self.seq, "type": event_type}
        self.state = apply_event(self.state, {**event, "ts": at(seconds), **fields})
        return self.state


def test_started_at_is_the_first_event_after_created() -> None:
    """started_at is null for a queued job, then the ts of the first event after created
    (whatever its type), and never moves again."""
    log = Log()
    assert log.state.started_at is None
    assert log.add(2, "log", message="picked up").started_at == at(2)
    assert log.add(3, current=1, total=10).started_at == at(2)
    assert log.add(4, "completed").started_at == at(2)


def test_one_sample_is_no_estimate_two_are() -> None:
    """The first position gives no rate (nothing to divide); the second gives gain / elapsed,
    and the ETA is what is left at that rate."""
    log = Log()
    first = log.add(1, current=0, total=100)
    assert (first.rate, first.eta_seconds) == (None, None)
    second = log.add(3, current=20)
    assert second.rate == 10.0
    assert second.eta_seconds == 8.0


def test_constant_speed_gives_that_speed_at_any_age() -> None:
    """A job advancing 5 units a second reports 5/s after 3 s and after an hour (the decay
    weighs intervals, not their rates, so a steady job is measured exactly)."""
    log = Log()
    log.add(0, current=0, total=100_000)
    for second in range(1, 3600, 7):
        state = log.add(second, current=5 * second)
        assert state.rate is not None
        assert math.isclose(state.rate, 5.0, rel_tol=1e-9)
    assert state.eta_seconds is not None
    assert math.isclose(state.eta_seconds, (100_000 - 5 * second) / 5, rel_tol=1e-9)


def test_events_of_one_commit_add_up() -> None:
    """Events with one ts (one commit) add their gains without dividing by zero: no rate
    while no time has passed, then every unit counted."""
    log = Log()
    log.add(1, current=0, total=1000)
    for current in range(1, 11):
        state = log.add(1, current=current)
        assert (state.rate, state.eta_seconds) == (None, None)
    for current in range(11, 21):
        state = log.add(2, current=current)
    # All 20 units counted in the one second that passed; the 10 of the first commit, one
    # second older, weigh as the window weighs a second's age.
    burst = 10 * RATE_WINDOW_SECONDS / (RATE_WINDOW_SECONDS + 1)
    assert state.rate == burst + 10
    assert state.eta_seconds == 980 / (burst + 10)


def test_no_rate_until_the_window_holds_a_second() -> None:
    """Commits microseconds apart at the start of a job give no rate (not millions a second):
    the estimate waits until MIN_RATE_SECONDS have passed in the window."""
    log = Log()
    log.add(1, current=0, total=100)
    for micros in range(1, 50):
        state = log.add(1 + micros / 1_000_000, current=micros)
        assert (state.rate, state.eta_seconds) == (None, None)
    state = log.add(1 + MIN_RATE_SECONDS + 0.5, current=75)  # (the window's seconds decay)
    assert state.rate is not None
    assert 45 < state.rate <= 50  # 75 units in 1.5 s, the older ones aged
    assert state.eta_seconds is not None


def test_a_stall_decays_the_rate_and_grows_the_eta() -> None:
    """While a worker only logs, time passes without progress: every log event lowers the
    rate and raises the ETA, which stays positive and finite; progress brings it back."""
    log = Log()
    log.add(0, current=0, total=1000)
    state = log.add(10, current=100)
    rates: list[float] = []
    etas: list[float] = []
    for second in range(10, 200, 10):
        if second > 10:
            state = log.add(second, "log", message="still waiting for the lock")
        assert state.rate is not None
        assert state.eta_seconds is not None
        rates.append(state.rate)
        etas.append(state.eta_seconds)
    assert all(a > b > 0 for a, b in itertools.pairwise(rates))
    assert all(0 < a < b for a, b in itertools.pairwise(etas))
    resumed = log.add(201, current=200)
    assert resumed.rate is not None
    assert resumed.rate > rates[-1]


def test_a_long_silence_then_progress_is_measured_over_the_silence() -> None:
    """Ten minutes without any event, then 60 units: the rate is about 60 / 600 s, not the
    old rate (the window is RATE_WINDOW_SECONDS, the old intervals weigh almost nothing)."""
    log = Log()
    log.add(0, current=0, total=10_000)
    log.add(10, current=1000)  # 100/s
    state = log.add(610, current=1060)
    assert state.rate is not None
    assert 0.1 < state.rate < 0.1 + 1000 * RATE_WINDOW_SECONDS / (RATE_WINDOW_SECONDS + 600) / 600


def test_a_reset_starts_a_new_window() -> None:
    """current going down (a retry from scratch) restarts the window: no estimate until a
    second sample, and then only the new run's speed."""
    log = Log()
    log.add(0, current=0, total=100)
    log.add(10, current=90)
    state = log.add(11, current=5)
    assert (state.rate, state.eta_seconds) == (None, None)
    assert state.to_dict()["rate_window"] == {"advance": 0.0, "seconds": 0.0}
    state = log.add(13, current=7)
    assert state.rate == 1.0
    assert state.eta_seconds == 93.0


def test_a_new_total_changes_the_eta_not_the_rate() -> None:
    """total growing (more work found) keeps the rate and recomputes the ETA from it."""
    log = Log()
    log.add(0, current=0, total=100)
    before = log.add(10, current=50)
    after = log.add(10, total=200)
    assert after.rate == before.rate == 5.0
    assert (before.eta_seconds, after.eta_seconds) == (10.0, 30.0)


def test_current_without_total_has_a_rate_but_no_eta() -> None:
    """Counting without a total: a rate, and no ETA (nothing says how much is left)."""
    log = Log()
    log.add(0, current=0)
    state = log.add(4, current=10)
    assert (state.rate, state.eta_seconds) == (2.5, None)


def test_fractions_only_give_an_eta_but_no_rate() -> None:
    """A job that reports only progress (percent) gets an ETA from how fast the percentage
    moves; rate stays null (it is in units of current, which the job never reported)."""
    log = Log()
    log.add(0, progress=0)
    state = log.add(10, progress=25.0)
    assert state.rate is None
    assert state.eta_seconds == 30.0
    assert log.add(12, progress=100).eta_seconds == 0.0


def test_current_appearing_starts_a_window_in_its_unit() -> None:
    """A job that reported percentages and then counts: the percentages' window is not
    mixed into the count's rate."""
    log = Log()
    log.add(0, progress=10)
    log.add(10, progress=50)
    state = log.add(11, current=3, total=10)
    assert (state.rate, state.eta_seconds) == (None, None)
    state = log.add(12, current=5)
    assert (state.rate, state.eta_seconds) == (2.0, 2.5)


def test_no_progress_in_the_window_is_no_eta() -> None:
    """A second sample that gained nothing: rate 0, ETA null (not infinite, not negative)."""
    log = Log()
    log.add(0, current=3, total=10)
    state = log.add(5, current=3)
    assert (state.rate, state.eta_seconds) == (0.0, None)


def test_all_done_but_not_finished_is_eta_zero() -> None:
    """current == total on a running job: ETA 0 (the work is done, the job not yet)."""
    log = Log()
    log.add(0, current=0, total=4)
    assert log.add(2, current=4).eta_seconds == 0.0


def test_a_finished_job_has_no_estimate() -> None:
    """completed, failed and cancelled clear rate, eta_seconds and the window: a finished
    job has nothing left to estimate (the status says so); started_at stays."""
    for terminal in (
        {"event_type": "completed"},
        {"event_type": "failed", "error": {"message": "x"}},
        {"event_type": "cancelled"},
    ):
        log = Log()
        log.add(0, current=0, total=10)
        assert log.add(1, current=5).eta_seconds == 1.0
        done = log.add(2, **terminal)
        assert (done.rate, done.eta_seconds, done.to_dict()["rate_window"]) == (None, None, None)
        assert done.started_at == at(0)


def test_snapshot_stored_before_rates_loads_and_starts_a_window() -> None:
    """JSON without started_at, rate, eta_seconds and rate_window (stored before migration
    0007) loads with them null; the job's next event starts a window there."""
    log = Log()
    log.add(0, current=0, total=10)
    old = log.add(1, current=2).to_dict()
    for name in ("started_at", "rate", "eta_seconds", "rate_window"):
        del old[name]
    loaded = JobState.from_json(orjson.dumps(old))
    assert (loaded.started_at, loaded.rate, loaded.eta_seconds) == (None, None, None)
    after = apply_event(
        loaded, {"job_id": "j", "seq": 4, "id": 4, "type": "progress", "ts": at(2), "current": 4}
    )
    assert (after.rate, after.eta_seconds) == (None, None)
    assert after.to_dict()["rate_window"] == {"advance": 0.0, "seconds": 0.0}
    assert after.started_at == at(2)  # the first event after created this snapshot knows of


# -- property: any progress history ------------------------------------------------------------

# Gaps between events, in microseconds: many at one ts (a commit), one µs, sub-second, minutes.
gaps = st.sampled_from([0, 0, 0, 1, 999, 250_000, 1_000_000, 7_000_000, 600_000_000])


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[int, str, dict[str, Any]]]:
    """(gap in µs, event type, fields) for the events after created, valid as the writer
    would store them: current never over total; counts go up, stall, or start over."""
    steps: list[tuple[int, str, dict[str, Any]]] = []
    current: int | None = None
    total: int | None = None
    for _ in range(draw(st.integers(0, 30))):
        gap = draw(gaps)
        move = draw(
            st.sampled_from(["advance", "advance", "stall", "reset", "total", "fraction", "log"])
        )
        fields: dict[str, Any] = {}
        if move == "advance":
            current = (current or 0) + draw(st.integers(0, 2**40))
            fields["current"] = current = min(current, 2**53)
        elif move == "stall":
            fields["message"] = "no change"
        elif move == "reset" and current is not None:
            fields["current"] = current = draw(st.integers(0, current))
        elif move == "total":
            fields["total"] = total = max(draw(st.integers(0, 2**53)), current or 0)
        elif move == "fraction":
            fields["progress"] = draw(st.floats(0, 100))
        if total is not None and current is not None and current > total:
            fields["total"] = total = current
        event_type = "log" if move == "log" or not fields else "progress"
        if event_type == "log":
            fields = {"message": "tick"}
        steps.append((gap, event_type, fields))
    ending = draw(st.sampled_from([None, "completed", "cancelled"]))
    if ending:
        steps.append((draw(gaps), ending, {}))
    return steps


@settings(max_examples=300, deadline=None)
@given(history=histories())
def test_estimates_are_never_negative_nan_or_stale(
    history: list[tuple[int, str, dict[str, Any]]],
) -> None:
    """After every event: rate and eta_seconds are null or finite and >= 0 (eta at most
    MAX_ETA_SECONDS); both null with fewer than two samples, with less than MIN_RATE_SECONDS
    in the window, and
    once finished; rate null when the job never reported current; the snapshot round-trips
    through JSON unchanged (so the writer's reload continues the same window)."""
    log = Log()
    micros = 0
    samples = 0
    for gap, event_type, fields in history:
        micros += gap
        state = log.add(micros / 1_000_000, event_type, **fields)
        window = state.to_dict()["rate_window"]
        for value in (state.rate, state.eta_seconds):
            assert value is None or (math.isfinite(value) and value >= 0)
        if state.eta_seconds is not None:
            assert state.eta_seconds <= MAX_ETA_SECONDS
        if state.finished:
            assert (state.rate, state.eta_seconds, window) == (None, None, None)
        elif state.current is not None or state.progress is not None:
            samples += 1
            assert window is not None
            assert window["seconds"] >= 0
            assert math.isfinite(window["advance"])
            assert window["advance"] >= 0
            if window["seconds"] < MIN_RATE_SECONDS:
                assert (state.rate, state.eta_seconds) == (None, None)
        if samples < 2 or state.current is None:
            assert state.rate is None
        assert JobState.from_json(state.to_json()) == state


# -- migration 0007 ---------------------------------------------------------------------------

# job_id -> the events after created: a running job counting, one only logging, one finished,
# and one never started.
OLD_LOGS: dict[str, list[dict[str, Any]]] = {
    "old-counting": [
        {"type": "progress", "current": 0, "total": 50, "progress": 0.0},
        {"type": "progress", "current": 20, "progress": 40.0},
    ],
    "old-fractions": [
        {"type": "log", "message": "m", "level": "info"},
        {"type": "progress", "progress": 30},
    ],
    "old-done": [{"type": "progress", "progress": 50}, {"type": "completed"}],
    "old-queued": [],
}


def make_v4_database(db: Path) -> None:
    """Schema version 4 (tenants) holding jobs as the writer stored them before rates:
    snapshots folded by the reducer, without started_at, rate, eta_seconds, rate_window."""
    old = bundled_migrations()[:4]
    assert [m.version for m in old] == [1, 2, 3, 4]
    apply_migrations(db, old)
    event_id = 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for job_id, body in OLD_LOGS.items():
            state: JobState | None = None
            for seq, fields in enumerate([{"type": "created"}, *body], start=1):
                event_id += 1
                event = {"job_id": job_id, "seq": seq, "id": event_id, "ts": at(seq), **fields}
                state = apply_event(state, event)
                conn.execute(
                    "INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body)"
                    " VALUES (?, 'default', ?, ?, ?, ?, NULL, ?)",
                    (
                        event_id,
                        job_id,
                        seq,
                        event["type"],
                        event["ts"],
                        orjson.dumps(event).decode(),
                    ),
                )
            assert state is not None
            snapshot = state.to_dict()
            for name in ("started_at", "rate", "eta_seconds", "rate_window"):
                del snapshot[name]
            conn.execute(
                "INSERT INTO jobs (tenant, job_id, kind, status, last_seq, created_at,"
                " updated_at, finished_at, snapshot) VALUES ('default', ?, NULL, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    state.status,
                    state.last_seq,
                    state.created_at,
                    state.updated_at,
                    state.finished_at,
                    orjson.dumps(snapshot).decode(),
                ),
            )


def stored_snapshots(db: Path) -> dict[str, dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT job_id, snapshot FROM jobs").fetchall()
    return {job_id: json.loads(raw) for job_id, raw in rows}


def test_migration_0007_backfills_started_at_and_an_empty_estimate(tmp_path: Path) -> None:
    """On a schema-4 database with jobs, 0007 adds started_at (the seq-2 event's ts, null for
    a job without one) and rate, eta_seconds, rate_window null to every snapshot, and changes
    nothing else; a second run of the statement changes nothing."""
    db = tmp_path / "v4.db"
    make_v4_database(db)
    before = stored_snapshots(db)
    assert "0007_rate.sql" in apply_migrations(db)
    migrated = stored_snapshots(db)
    after = stored_snapshots(db)
    for job_id, body in OLD_LOGS.items():
        added = {
            name: after[job_id].pop(name)
            for name in ("started_at", "rate", "eta_seconds", "rate_window")
        }
        assert added == {
            "started_at": at(2) if body else None,
            "rate": None,
            "eta_seconds": None,
            "rate_window": None,
        }, job_id
        assert after[job_id] == before[job_id], job_id
    migration = next(m for m in bundled_migrations() if m.name == "0007_rate.sql")
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(migration.sql)
    assert stored_snapshots(db) == migrated


async def test_app_on_a_migrated_database_estimates_from_the_next_event(
    make_client: ClientFactory, make_config: ConfigFactory, tmp_path: Path
) -> None:
    """The app opening a schema-4 file migrates it and serves the new fields; a running job's
    next event starts its window, so its stored snapshot is the fold of its log except for
    the estimate, which starts over at the upgrade; a finished job equals its fold."""
    db = tmp_path / "upgrade.db"
    make_v4_database(db)
    client = await make_client(make_config(storage__path=db))
    done = await (await client.get("/v1/jobs/old-done")).json()
    log = await read_log(client, "old-done")
    assert done == fold_dicts(log)
    await append(client, "old-counting", {"type": "progress", "current": 30})
    counting = await (await client.get("/v1/jobs/old-counting")).json()
    assert counting["started_at"] == at(2)
    assert counting["rate_window"] == {"advance": 0.0, "seconds": 0.0}
    assert (counting["rate"], counting["eta_seconds"]) == (None, None)
    expected = fold_dicts(await read_log(client, "old-counting"))
    assert expected["rate_window"] != counting["rate_window"]  # the log's own window
    for name in ("rate", "eta_seconds", "rate_window"):
        expected[name] = counting[name]
    assert counting == expected
    queued = await (await client.get("/v1/jobs/old-queued")).json()
    assert (queued["started_at"], queued["rate_window"]) == (None, None)


def fold_dicts(log: list[dict[str, Any]]) -> dict[str, Any]:
    state: JobState | None = None
    for event in log:
        state = apply_event(state, event)
    assert state is not None
    return state.to_dict()
