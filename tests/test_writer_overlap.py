"""The writer hands the next group to the SQLite thread before it answers the group just
committed (``Writer._run``).

That next group must be planned on what the group before it committed (its job states, ids
and ts), and never on what a failed group would have written: no hole in a job's seqs, no
event for a job that was never created, no refusal that assumed the failed group.

Groups are made small (``storage.max_batch_events = 3``) and every request is queued
before the writer runs, so the second group is queued when the first one's COMMIT returns.
The fault is a real SQLite error: a trigger that aborts any insert of one job's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.errors import JobExists, JobNotFound, StorageUnavailable
from server.hub import Hub
from server.models import LogIn
from server.snapshot import JobState
from server.store import Store
from server.tenancy import JobKey
from server.writer import AppendResult
from tests.conftest import ConfigFactory


def key(job_id: str) -> JobKey:
    return JobKey("default", job_id)


def log_event(message: str) -> LogIn:
    return LogIn(type="log", message=message)


@pytest.fixture
async def store(make_config: ConfigFactory) -> AsyncIterator[Store]:
    config = make_config(storage__max_batch_events=3, watchdog__batch_jobs=3)
    opened = Store(config, Hub(config.stream.cache_events_per_job, config.stream.cache_bytes))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def stored(store: Store) -> list[tuple[int, str, int]]:
    """Every stored event as (id, job_id, seq), in id order."""
    conn: Any = store._writer_conn
    rows = await conn.execute_fetchall("SELECT id, job_id, seq FROM events ORDER BY id")
    return [tuple(row) for row in rows]


async def test_the_group_after_a_failed_one_is_planned_on_the_file(store: Store) -> None:
    """The first group (a create, an append to ``j``, an append the trigger aborts) fails
    whole and publishes nothing. The second group holds an append to the job the first
    would have created, an append to ``j`` (seq 3 had the first committed) and a second
    create of that job (refused as existing had it). The append to the uncreated job is
    404, ``j`` goes on at seq 2 and the create succeeds; the ids go on without a hole."""
    writer = store.writer
    await writer.create_job(key("j"), None, None)
    await writer.create_job(key("boom"), None, None)
    conn: Any = store._writer_conn
    await conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON events WHEN NEW.job_id = 'boom'"
        " BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    )
    first: list[asyncio.Future[Any]] = [
        writer.submit_create(key("fresh"), None, None),
        writer.submit_append(key("j"), [log_event("a")]),
        writer.submit_append(key("boom"), [log_event("x")]),
    ]
    second: list[asyncio.Future[Any]] = [
        writer.submit_append(key("fresh"), [log_event("b")]),
        writer.submit_append(key("j"), [log_event("c")]),
        writer.submit_create(key("fresh"), "second", None),
    ]
    first_outcomes = await asyncio.gather(*first, return_exceptions=True)
    assert all(isinstance(outcome, StorageUnavailable) for outcome in first_outcomes)
    outcomes: list[Any] = await asyncio.gather(*second, return_exceptions=True)
    missing, appended, created = outcomes
    assert isinstance(missing, JobNotFound), missing
    assert isinstance(appended, AppendResult), appended
    assert appended.events[0].seq == 2
    assert isinstance(created, JobState), created
    assert created.kind == "second"
    assert writer.healthy
    assert await stored(store) == [(1, "j", 1), (2, "boom", 1), (3, "j", 2), (4, "fresh", 1)]
    hub: Any = store._hub
    assert hub.high_water(key("boom")) == 1, "the failed group's frames were published"


async def test_the_next_group_is_planned_on_the_committed_one(store: Store) -> None:
    """Planned before the first group is answered, the second sees everything it
    committed: the job it created (an append to it is seq 2, a second create is refused),
    the next seq of a job it appended to, and ids that go on from its own."""
    writer = store.writer
    await writer.create_job(key("j"), None, None)
    commits_before = writer.commits
    first: list[asyncio.Future[Any]] = [
        writer.submit_create(key("fresh"), None, None),
        writer.submit_append(key("j"), [log_event("a")]),
        writer.submit_append(key("j"), [log_event("b")]),
    ]
    second: list[asyncio.Future[Any]] = [
        writer.submit_append(key("fresh"), [log_event("c")]),
        writer.submit_append(key("j"), [log_event("d")]),
        writer.submit_create(key("fresh"), None, None),
    ]
    await asyncio.gather(*first)
    outcomes: list[Any] = await asyncio.gather(*second, return_exceptions=True)
    appended_fresh, appended_j, again = outcomes
    assert isinstance(appended_fresh, AppendResult)
    assert appended_fresh.events[0].seq == 2
    assert isinstance(appended_j, AppendResult)
    assert appended_j.events[0].seq == 4
    assert isinstance(again, JobExists), again
    assert writer.commits - commits_before == 2
    assert await stored(store) == [
        (1, "j", 1),
        (2, "fresh", 1),
        (3, "j", 2),
        (4, "j", 3),
        (5, "fresh", 2),
        (6, "j", 4),
    ]
