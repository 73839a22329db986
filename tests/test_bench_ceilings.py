"""The bench's SQLite ceiling writes the rows jobfeed writes, on the schema the migrations make.

A schema change (tenants, in migration 0004) once broke it without any test noticing: the
ceiling then failed in `make bench` only. Here it runs briefly on the real migrations.
"""

from bench.ceilings import sqlite_group_commit


def test_sqlite_ceiling_commits_on_the_current_schema() -> None:
    phase = sqlite_group_commit(
        "ceiling smoke", synchronous="NORMAL", batch=16, jobs=4, seconds=0.05
    )
    assert phase.metrics["events/s"] > 0
