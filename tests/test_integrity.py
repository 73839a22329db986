"""Start-up refuses a database it must not serve: a damaged file (``PRAGMA quick_check``),
a file that is not a database, a schema from a newer jobfeed. ``jobfeed serve`` exits
non-zero with one line on stderr. ``storage.integrity_check = false`` skips the check.

Real SQLite files, damaged in place; the CLI runs as a child process.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.migrate import apply_migrations, bundled_migrations
from tests.procs import Launcher, launching
from tests.test_migrate import execute, run_cli, write_config


def build_database(db: Path, events: int = 2_000) -> tuple[int, int]:
    """A real jobfeed database with one job's log spread over many pages; all of it in the
    main file (no WAL). Returns (page_size, page_count)."""
    apply_migrations(db)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO jobs (tenant, job_id, status, last_seq, created_at, updated_at,"
            " snapshot) VALUES ('default', 'j', 'running', ?, 'ts', 'ts', '{}')",
            (events,),
        )
        conn.executemany(
            "INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [
                (i, "default", "j", i, "log", "ts", None, '{"m":"' + "x" * 200 + '"}')
                for i in range(1, events + 1)
            ],
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = DELETE")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        page_count = conn.execute("PRAGMA page_count").fetchone()[0]
    return page_size, page_count


def damage_middle_page(db: Path) -> None:
    """Overwrite 512 bytes in the middle of a page in the middle of the file (a leaf of
    the events table: cell pointers and records), leaving the header and schema intact."""
    page_size, page_count = build_database(db)
    page = page_count // 2
    with db.open("r+b") as file:
        file.seek((page - 1) * page_size + page_size // 2)
        file.write(b"\xff" * 512)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_serve_refuses_a_damaged_database(tmp_path: Path) -> None:
    """A database with a damaged page in the middle is refused at start-up: exit 1, one
    line naming the file and the integrity check; the file is left as it was."""
    config = write_config(tmp_path, "jobfeed.db")
    db = tmp_path / "jobfeed.db"
    damage_middle_page(db)
    before = db.read_bytes()
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert "integrity check failed" in line, line
    assert str(db) in line, line
    assert db.read_bytes() == before


def test_migrate_refuses_a_damaged_database(tmp_path: Path) -> None:
    """``jobfeed migrate`` runs the same integrity check as ``serve``: a damaged file is
    refused with exit 1 and one line, and nothing is written to it."""
    config = write_config(tmp_path, "jobfeed.db")
    db = tmp_path / "jobfeed.db"
    damage_middle_page(db)
    before = db.read_bytes()
    result = run_cli("migrate", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert "integrity check failed" in line, line
    assert str(db) in line, line
    assert db.read_bytes() == before


def test_serve_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite at all is refused: exit 1, one line."""
    config = write_config(tmp_path, "jobfeed.db")
    (tmp_path / "jobfeed.db").write_bytes(b"this is not a database\n" * 1_000)
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "not a database" in one_line(result.stderr)


def test_serve_refuses_a_schema_newer_than_the_code(tmp_path: Path) -> None:
    """A database migrated by a newer jobfeed is refused by ``serve``: exit 1, one line
    that says to upgrade."""
    config = write_config(tmp_path, "jobfeed.db")
    db = tmp_path / "jobfeed.db"
    apply_migrations(db)
    execute(
        db,
        "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?,?,?,?)",
        bundled_migrations()[-1].version + 1,
        "9999_from_the_future.sql",
        "f" * 64,
        "2030-01-01T00:00:00+00:00",
    )
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert "newer" in line, line
    assert "upgrade jobfeed" in line, line


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


@pytest.mark.process
async def test_integrity_check_can_be_turned_off(jobfeed_process: Launcher) -> None:
    """With storage.integrity_check = false the damaged page goes unnoticed at start-up
    (the server starts and is ready): the check is what refuses such a file."""
    damage_middle_page(jobfeed_process.db_path)
    server = await jobfeed_process.start(storage__integrity_check="false")
    assert server.log.find("listening") is not None
