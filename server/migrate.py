"""Schema migrations: ``migrations/NNNN_name.sql`` applied in order, each with its record.

Each file runs in one transaction together with its row in ``schema_migrations`` (version,
name, sha256), so a crash never leaves a half-applied migration. A file whose checksum differs
from the applied one, or a database that has versions this code does not know, is refused:
migrations are append-only and never edited once landed.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """The database's schema cannot be brought to this code's version."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def bundled_migrations() -> list[Migration]:
    """The migrations shipped with this package (``server.migrations``), in version order."""
    found: list[Migration] = []
    for entry in resources.files("server.migrations").iterdir():
        match = _NAME_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbers are handed out to branches in advance, so that they merge in any order: a
    # branch may ship 0006 before 0005 exists. Unique and from 1 is the rule; gaps are not.
    if len(set(versions)) != len(versions) or (versions and versions[0] != 1):
        raise MigrationError(f"migrations must be numbered uniquely from 1, found {versions}")
    return found


_RECORD_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    applied_at TEXT NOT NULL
)
"""


def applied_versions(conn: sqlite3.Connection) -> dict[int, tuple[str, str]]:
    conn.execute(_RECORD_TABLE)
    rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
    return {version: (name, checksum) for version, name, checksum in rows}


def check_applied(
    applied: dict[int, tuple[str, str]], migrations: list[Migration]
) -> list[Migration]:
    """Verify what is applied against the files; return what is still to apply."""
    known = {m.version: m for m in migrations}
    newer = sorted(set(applied) - set(known))
    if newer:
        raise MigrationError(
            f"database has schema version {newer[-1]}, newer than this jobfeed knows "
            f"({max(known, default=0)}); upgrade jobfeed"
        )
    for version, (name, checksum) in sorted(applied.items()):
        if known[version].checksum != checksum:
            raise MigrationError(
                f"migration {name} was changed after it was applied (checksum mismatch); "
                "migrations are append-only: add a new one instead"
            )
    return [m for m in migrations if m.version not in applied]


def apply_migrations(db_path: Path, migrations: list[Migration] | None = None) -> list[str]:
    """Bring the database at ``db_path`` up to date; return the names applied now."""
    migrations = bundled_migrations() if migrations is None else migrations
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        pending = check_applied(applied_versions(conn), migrations)
        applied_now = []
        for migration in pending:
            now = datetime.now(UTC).isoformat()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # A second process may have migrated while we waited for the write lock.
                if migration.version in applied_versions(conn):
                    conn.execute("ROLLBACK")
                    continue
                for statement in _statements(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at) "
                    "VALUES (?, ?, ?, ?)",
                    (migration.version, migration.name, migration.checksum, now),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            applied_now.append(migration.name)
        return applied_now
    except sqlite3.DatabaseError as exc:
        raise MigrationError(f"{db_path}: {exc}") from exc
    finally:
        conn.close()


def _statements(sql: str) -> list[str]:
    """Split a migration into complete statements (``sqlite3.complete_statement`` decides)."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip() and not current.strip().startswith("--"):
        raise MigrationError(f"incomplete SQL statement at the end of a migration: {current!r}")
    return [s for s in statements if s]


def schema_version(conn: sqlite3.Connection) -> int:
    return max(applied_versions(conn), default=0)
