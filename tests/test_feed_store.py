"""The feed's SQLite reads: the query plans that keep a sparse filter's replay from scanning
the log on every page, and the one-statement reads that make cursor and snapshots exact."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server import migrate
from server.feed import FeedFilter
from server.store import feed_query

FILTERS = {
    "none": FeedFilter(),
    "job": FeedFilter(jobs=frozenset({"a", "b"})),
    "prefix": FeedFilter(prefix="build-"),
    "kind": FeedFilter(kinds=frozenset({"rc_analysis"})),
    "type": FeedFilter(types=frozenset({"completed", "failed"})),
    "all": FeedFilter(
        jobs=frozenset({"a"}),
        prefix="a",
        kinds=frozenset({"k"}),
        types=frozenset({"log"}),
    ),
}


@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    path = tmp_path / "plans.db"
    migrate.apply_migrations(path)
    conn = sqlite3.connect(path)
    # A log that looks big to the planner: with statistics it might otherwise prefer a scan.
    conn.execute("ANALYZE")
    return conn


def plan(conn: sqlite3.Connection, feed_filter: FeedFilter) -> list[str]:
    query, params = feed_query(feed_filter)
    rows = conn.execute(f"EXPLAIN QUERY PLAN {query}", [0, 10_000, *params, 500]).fetchall()
    return [str(row[3]) for row in rows]


@pytest.mark.parametrize("name", list(FILTERS))
def test_each_replay_step_is_a_primary_key_range(db: sqlite3.Connection, name: str) -> None:
    """Whatever the filter, a step reads events by a rowid range (after < id <= upper), in
    id order without a sort, and finds a job's kind by the jobs' unique job_id index: its
    cost is bounded by the window, never by the log or by a job's whole history."""
    steps = plan(db, FILTERS[name])
    assert steps[0] == "SEARCH e USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)", steps
    assert not any("SCAN" in step for step in steps), steps
    assert not any("TEMP B-TREE" in step for step in steps), steps
    if FILTERS[name].kinds:
        assert steps[1] == "SEARCH j USING INDEX sqlite_autoindex_jobs_1 (tenant=? AND job_id=?)", (
            steps
        )
    else:
        assert len(steps) == 1, steps


def test_last_id_is_read_with_the_same_statement(db: sqlite3.Connection) -> None:
    """MAX(id) on the rowid is one b-tree descent, not a scan."""
    steps = [
        str(row[3])
        for row in db.execute("EXPLAIN QUERY PLAN SELECT COALESCE(MAX(id), 0) FROM events")
    ]
    assert not any(step.startswith("SCAN") for step in steps), steps
