"""``jobfeed backup`` and ``jobfeed restore`` (server.backup) on real files, with a real server
process: a backup taken under appends holds every event acknowledged before it began and
passes ``PRAGMA integrity_check``; a restore refuses a running server, migrates an old backup,
refuses a newer one, leaves no stale ``-wal`` behind, and starts a new generation, so that a
client resuming (job stream or feed, WebSocket or SSE) with an epoch from before it is told
``log_reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.backup import backup as take_backup
from server.generation import Generation, base_epoch
from server.migrate import apply_migrations, bundled_migrations
from tests.procs import Launcher, ServerProcess, launching
from tests.test_tenancy_schema import OLD_JOBS, make_v3_database

pytestmark = pytest.mark.process

WAIT = 20.0
CLI_TIMEOUT = 60.0
SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as started:
        yield started


def config_of(launcher: Launcher) -> Path:
    """The config file the launcher wrote (storage.path = launcher.db_path)."""
    path = launcher.workdir / "jobfeed-test.toml"
    if not path.exists():
        path.write_text(f"[storage]\npath = {json.dumps(str(launcher.db_path))}\n")
    return path


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("JOBFEED_")}


def run_cli(launcher: Launcher, *args: str) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return subprocess.run(
        [sys.executable, "-m", "server", command, "--config", str(config_of(launcher)), *rest],
        cwd=launcher.workdir,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def query(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


async def stop(process: ServerProcess) -> None:
    process.kill(signal.SIGTERM)
    assert await process.wait_async(WAIT) == 0, process.describe()


async def post(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> Any:
    async with session.post(path, json=body) as response:
        assert response.status in (200, 201), await response.text()
        return await response.json()


async def ws_opening(session: aiohttp.ClientSession, path: str) -> tuple[dict[str, Any], int]:
    """The first frame of a WebSocket stream and how it ended (close code; 0: still open)."""
    async with session.ws_connect(path) as ws, asyncio.timeout(WAIT):
        message = await ws.receive()
        assert message.type == aiohttp.WSMsgType.TEXT, message
        first: dict[str, Any] = json.loads(message.data)
        if first.get("type") == "error":
            closing = await ws.receive()
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
            return first, ws.close_code or 0
        return first, 0


async def sse_status(session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with session.get(path, headers=SSE) as response, asyncio.timeout(WAIT):
        if response.status != 200:
            return response.status, await response.json()
        return 200, None


# -- backup -----------------------------------------------------------------------------------


async def test_backup_under_appends_holds_every_acknowledged_event(launcher: Launcher) -> None:
    """While producers keep appending, ``jobfeed backup`` copies the live database (it needs
    no lock: the server holds it). Every event acknowledged before the backup began is in the
    copy; the copy passes ``PRAGMA integrity_check``, each job's log in it is whole (seqs
    1..last_seq, as its snapshot says), and the line printed says what it holds."""
    server = await launcher.start()
    dest = launcher.workdir / "backup.db"
    jobs = [f"b-{n}" for n in range(4)]
    acked: list[int] = []
    stopping = asyncio.Event()
    enough = asyncio.Event()  # a log with some length before the copy starts
    async with aiohttp.ClientSession(server.url) as session:
        for job in jobs:
            await post(session, "/v1/jobs", {"job_id": job, "kind": "backup"})

        async def produce(job: str) -> None:
            n = 0
            while not stopping.is_set():
                n += 1
                answer = await post(
                    session, f"/v1/jobs/{job}/events", {"type": "log", "message": f"m{n}"}
                )
                acked.append(answer["events"][0]["id"])
                if len(acked) >= 200:
                    enough.set()

        producers = [asyncio.create_task(produce(job)) for job in jobs]
        await asyncio.wait_for(enough.wait(), WAIT)
        acked_before = list(acked)
        backup = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "backup", "--config", str(config_of(launcher)),
            str(dest), cwd=launcher.workdir, env=cli_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(backup.communicate(), CLI_TIMEOUT)
        during = len(acked) - len(acked_before)
        stopping.set()
        await asyncio.gather(*producers)
    assert backup.returncode == 0, err.decode()
    assert during > 0, "no append was acknowledged while the backup ran"
    copied = {event_id for (event_id,) in query(dest, "SELECT id FROM events")}
    assert set(acked_before) <= copied
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]
    for job in jobs:
        seqs = [
            s for (s,) in query(dest, "SELECT seq FROM events WHERE job_id = ? ORDER BY seq", job)
        ]
        (last_seq,) = query(dest, "SELECT last_seq FROM jobs WHERE job_id = ?", job)[0]
        assert seqs == list(range(1, last_seq + 1)), job
    line = one_line(out.decode())
    events, last_id = query(dest, "SELECT COUNT(*), MAX(id) FROM events")[0]
    assert f"{len(jobs)} jobs, {events} events, last id {last_id}, schema 8, generation g0-" in line
    assert not list(launcher.workdir.glob(".backup.db.partial-*"))


def test_backup_refuses_an_existing_destination_without_force(launcher: Launcher) -> None:
    """DEST exists: exit 1 with one line, DEST untouched; ``--force`` replaces it."""
    apply_migrations(launcher.db_path)
    dest = launcher.workdir / "backup.db"
    dest.write_bytes(b"an older backup")
    refused = run_cli(launcher, "backup", str(dest))
    assert refused.returncode == 1
    assert "exists" in one_line(refused.stderr)
    assert "--force" in refused.stderr
    assert dest.read_bytes() == b"an older backup"
    forced = run_cli(launcher, "backup", "--force", str(dest))
    assert forced.returncode == 0, forced.stderr
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]


# -- restore ----------------------------------------------------------------------------------


async def test_restore_refuses_while_the_server_runs(launcher: Launcher) -> None:
    """The server holds the database's lock: restore exits 1 naming the holder's pid, and
    the database is untouched."""
    server = await launcher.start()
    backup = launcher.workdir / "backup.db"
    take_backup(launcher.db_path, backup)  # the CLI is tested above
    before = query(launcher.db_path, "SELECT number, tag FROM generation")
    refused = run_cli(launcher, "restore", str(backup))
    assert refused.returncode == 1
    assert f"pid {server.pid}" in one_line(refused.stderr)
    assert query(launcher.db_path, "SELECT number, tag FROM generation") == before


async def test_clients_from_before_a_restore_get_log_reset(launcher: Launcher) -> None:
    """Backup, more appends (clients read them), restore, resume: a job stream and the feed
    resumed with the epoch they saw get log_reset (WebSocket 4409, SSE 409), even at an
    offset the restored log holds; the new epochs carry the new generation, and a job
    created after the restore has it too."""
    server = await launcher.start()
    backup = launcher.workdir / "backup.db"
    async with aiohttp.ClientSession(server.url) as session:
        created = await post(session, "/v1/jobs", {"job_id": "r-1"})
        old_epoch = created["epoch"]
        for n in range(3):
            await post(session, "/v1/jobs/r-1/events", {"type": "log", "message": f"a{n}"})
        take_backup(launcher.db_path, backup)  # the CLI is tested above
        for n in range(3):
            await post(session, "/v1/jobs/r-1/events", {"type": "log", "message": f"b{n}"})
        job_hello, _ = await ws_opening(session, f"/v1/jobs/r-1/stream?after=7&epoch={old_epoch}")
        feed_hello, _ = await ws_opening(session, "/v1/feed?after=0")
    assert job_hello["epoch"] == old_epoch
    old_feed_epoch = feed_hello["epoch"]
    assert old_feed_epoch.startswith("g0-")
    await stop(server)

    restored = run_cli(launcher, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert "generation g1-" in one_line(restored.stdout)
    ((number, tag),) = query(launcher.db_path, "SELECT number, tag FROM generation")
    generation = Generation(number, tag)
    assert number == 1

    server = await launcher.start()
    async with aiohttp.ClientSession(server.url) as session:
        # The client had seq 7 (gone) and seq 2 (still there): both are another log now.
        for after in (7, 2):
            path = f"/v1/jobs/r-1/stream?after={after}&epoch={old_epoch}"
            frame, code = await ws_opening(session, path)
            assert (frame.get("code"), code) == ("log_reset", 4409), frame
            status, body = await sse_status(session, path)
            assert (status, body["error"]["code"]) == (409, "log_reset")
        for after in (7, 2):
            path = f"/v1/feed?after={after}&epoch={old_feed_epoch}"
            frame, code = await ws_opening(session, path)
            assert (frame.get("code"), code) == ("log_reset", 4409), frame
            status, body = await sse_status(session, path)
            assert (status, body["error"]["code"]) == (409, "log_reset")
        # From scratch (or with the new epochs) everything streams.
        job_hello, code = await ws_opening(session, "/v1/jobs/r-1/stream?after=0")
        assert code == 0
        assert job_hello["epoch"] == f"{old_epoch}-g1-{tag}" == generation.job_epoch(old_epoch)
        assert job_hello["last_seq"] == 4
        feed_hello, code = await ws_opening(session, "/v1/feed?after=0")
        assert (feed_hello["epoch"], code) == (generation.feed_epoch, 0)
        path = f"/v1/feed?after=4&epoch={generation.feed_epoch}"
        assert (await ws_opening(session, path))[1] == 0
        fresh = await post(session, "/v1/jobs", {"job_id": "r-2"})
        assert fresh["epoch"].endswith(f"-g1-{tag}")
        assert base_epoch(fresh["epoch"]) != base_epoch(old_epoch)


def test_restore_migrates_an_older_backup_and_refuses_a_newer_one(launcher: Launcher) -> None:
    """A backup made by schema 0004 (with rows) is migrated on restore and its epochs get the
    new generation; one from a newer jobfeed is refused and the database stays as it was."""
    old = launcher.workdir / "v4-backup.db"
    make_v3_database(old)
    apply_migrations(old, bundled_migrations()[:4])
    epochs = dict(query(old, "SELECT job_id, json_extract(snapshot, '$.epoch') FROM jobs"))
    apply_migrations(launcher.db_path)

    restored = run_cli(launcher, "restore", str(old))
    assert restored.returncode == 0, restored.stderr
    db = launcher.db_path
    assert max(v for (v,) in query(db, "SELECT version FROM schema_migrations")) == 8
    ((number, tag),) = query(db, "SELECT number, tag FROM generation")
    assert number == 1
    after = dict(query(db, "SELECT job_id, json_extract(snapshot, '$.epoch') FROM jobs"))
    assert after == {job: f"{epoch}-g1-{tag}" for job, epoch in epochs.items()}
    assert set(after) == set(OLD_JOBS)
    assert query(old, "SELECT COUNT(*) FROM schema_migrations") == [(4,)]  # SRC not written

    newer = launcher.workdir / "newer.db"
    apply_migrations(newer)
    with contextlib.closing(sqlite3.connect(newer)) as conn, conn:
        conn.execute(
            "INSERT INTO schema_migrations VALUES (99, '0099_future.sql', 'f', '2030-01-01')"
        )
    before = db.read_bytes()
    refused = run_cli(launcher, "restore", str(newer))
    assert refused.returncode == 1
    assert "newer" in one_line(refused.stderr)
    assert db.read_bytes() == before


def test_restore_leaves_no_stale_wal_of_the_old_file(launcher: Launcher) -> None:
    """The old database's ``-wal`` (a crash left committed frames in it) must not be replayed
    into the restored file: after the restore the database holds the backup, whole."""
    apply_migrations(launcher.db_path)
    backup = launcher.workdir / "backup.db"
    take_backup(launcher.db_path, backup)  # the CLI is tested above
    # A writer that dies with its frames still in the WAL (no checkpoint, no close).
    script = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('PRAGMA journal_mode = WAL')\n"
        "conn.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "for n in range(50):\n"
        '    conn.execute("INSERT INTO events (tenant, job_id, seq, type, ts, body)'
        " VALUES ('default', 'ghost', ?, 'log', 't', '{}')\", (n + 1,))\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(launcher.db_path)], check=True)
    wal = launcher.db_path.with_name(launcher.db_path.name + "-wal")
    assert wal.exists()
    assert wal.stat().st_size > 0

    restored = run_cli(launcher, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert query(launcher.db_path, "SELECT COUNT(*) FROM events") == [(0,)]
    assert query(launcher.db_path, "PRAGMA integrity_check") == [("ok",)]
    assert not wal.exists() or wal.stat().st_size == 0
    assert re.search(r"generation g1-[0-9a-f]{8}", restored.stdout)


def test_restore_refuses_a_damaged_backup(launcher: Launcher) -> None:
    """A file that is not a database: exit 1 with one line; the database is untouched."""
    apply_migrations(launcher.db_path)
    bad = launcher.workdir / "bad.db"
    bad.write_bytes(b"not a database at all" * 100)
    before = launcher.db_path.read_bytes()
    refused = run_cli(launcher, "restore", str(bad))
    assert refused.returncode == 1
    assert "restore failed" in one_line(refused.stderr)
    assert launcher.db_path.read_bytes() == before
