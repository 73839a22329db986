"""``server.migrate``: numbered SQL files applied in order, each in one transaction with its
row in ``schema_migrations`` (version, name, sha256); edited or unknown migrations refused.

Real SQLite files in ``tmp_path``; the CLI tests run ``python -m server`` as a child process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from server.migrate import Migration, MigrationError, apply_migrations, bundled_migrations

REPO = Path(__file__).resolve().parent.parent
INITIAL = "0001_initial.sql"
ALL = [m.name for m in bundled_migrations()]
RECORDED = [(m.version, m.name) for m in bundled_migrations()]
CLI_TIMEOUT = 30.0


def table_names(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def schema_rows(db: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()


def execute(db: Path, sql: str, *params: object) -> None:
    """One statement in its own committed transaction."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(sql, params)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m server ARGS`` with no JOBFEED_* variables from the outer environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFEED_")}
    env["JOBFEED_SERVER__PORT"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def write_config(directory: Path, db: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.toml"
    config.write_text(f'[storage]\npath = "{db}"\n', encoding="utf-8")
    return config


def test_fresh_database_gets_the_schema_and_its_record(tmp_path: Path) -> None:
    """On a new file every migration is applied, in order: the tables exist and
    schema_migrations holds (version, the file's name, the file's sha256, an ISO timestamp)
    for each."""
    db = tmp_path / "fresh.db"
    assert apply_migrations(db) == ALL
    assert ALL[0] == INITIAL
    assert {"jobs", "events", "storage_probe", "schema_migrations"} <= table_names(db)
    rows = schema_rows(db)
    assert [row[:2] for row in rows] == RECORDED
    for _, name, checksum, applied_at in rows:
        assert checksum == hashlib.sha256((REPO / "migrations" / name).read_bytes()).hexdigest()
        assert datetime.fromisoformat(applied_at).tzinfo is not None


def test_rerun_applies_nothing_and_changes_nothing(tmp_path: Path) -> None:
    """Migrating an up-to-date database applies nothing and leaves its records as they were."""
    db = tmp_path / "twice.db"
    apply_migrations(db)
    before = schema_rows(db)
    assert apply_migrations(db) == []
    assert schema_rows(db) == before


def test_edited_migration_file_is_refused_naming_it(tmp_path: Path) -> None:
    """A migration whose text differs from the applied one (checksum mismatch) is refused
    with MigrationError naming the file, and nothing is recorded."""
    db = tmp_path / "edited.db"
    apply_migrations(db)
    before = schema_rows(db)
    initial, *later = bundled_migrations()
    edited = Migration(initial.version, initial.name, initial.sql + "\n-- edited later\n")
    with pytest.raises(MigrationError, match=INITIAL):
        apply_migrations(db, [edited, *later])
    assert schema_rows(db) == before


def test_changed_recorded_checksum_is_refused_naming_the_file(tmp_path: Path) -> None:
    """A database whose recorded checksum no longer matches the shipped file is refused
    with MigrationError naming the file."""
    db = tmp_path / "tampered.db"
    apply_migrations(db)
    execute(db, "UPDATE schema_migrations SET checksum = ? WHERE version = 1", "0" * 64)
    with pytest.raises(MigrationError, match=INITIAL):
        apply_migrations(db)


def test_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    """A database with a schema version this code does not know (from a newer jobfeed) is
    refused with MigrationError that says so."""
    db = tmp_path / "newer.db"
    apply_migrations(db)
    execute(
        db,
        "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?,?,?,?)",
        RECORDED[-1][0] + 1,
        "9999_from_the_future.sql",
        "f" * 64,
        "2030-01-01T00:00:00+00:00",
    )
    with pytest.raises(MigrationError, match="newer"):
        apply_migrations(db)


def test_failing_migration_leaves_neither_its_changes_nor_its_record(tmp_path: Path) -> None:
    """A migration that fails half-way is rolled back together with its record: the table
    its first statement created does not exist and its version is not recorded."""
    db = tmp_path / "broken.db"
    shipped = bundled_migrations()
    broken = Migration(
        shipped[-1].version + 1,
        "9999_broken.sql",
        "CREATE TABLE half (a INTEGER);\nNOT SQL AT ALL;\n",
    )
    with pytest.raises(MigrationError):
        apply_migrations(db, [*shipped, broken])
    assert "half" not in table_names(db)
    assert [row[:2] for row in schema_rows(db)] == RECORDED


def test_cli_migrate_creates_the_database(tmp_path: Path) -> None:
    """``jobfeed migrate --config PATH`` exits 0 and creates the database (relative path:
    next to the config file) with its tables, from another working directory."""
    config = write_config(tmp_path / "etc", "data/jobfeed.db")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = run_cli("migrate", "--config", str(config), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    db = tmp_path / "etc" / "data" / "jobfeed.db"
    assert {"jobs", "events", "schema_migrations"} <= table_names(db)
    assert [row[:2] for row in schema_rows(db)] == RECORDED
    assert not (elsewhere / "data").exists()


def test_serve_on_a_tampered_migration_fails_with_one_line(tmp_path: Path) -> None:
    """``jobfeed serve`` on a database whose applied migration was changed exits non-zero,
    writing exactly one line to stderr, which names the migration file."""
    config = write_config(tmp_path, "jobfeed.db")
    db = tmp_path / "jobfeed.db"
    apply_migrations(db)
    execute(db, "UPDATE schema_migrations SET checksum = ? WHERE version = 1", "0" * 64)
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert INITIAL in lines[0]
