"""Storage faults: a full disk, a database made read-only, a lock held by another process,
an I/O error at commit. Appends answer 503 ``storage_unavailable`` (with Retry-After) and
write nothing, open streams stay open, ``/readyz`` answers 503, and the server becomes
ready again by itself once the fault clears, with no append needed; the log stays
contiguous and every snapshot matches its log. Each fault is logged once.

The faults are real: a small tmpfs that fills up, ``chattr +i`` on the database files
(file modes do not stop root, nor a process that already has the file open), a second
process holding SQLite's write lock, and ``PRAGMA max_page_count`` on the writer's own
connection. Tests that need a privilege this machine lacks skip and say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.config import Config
from server.errors import StorageUnavailable
from server.hub import Hub
from server.models import LogIn
from server.store import Store
from server.tenancy import JobKey
from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.procs import Launcher, ServerProcess, fold_log, get_snapshot, launching, read_log

WAIT = 20.0  # bound on any one wait for a condition; a healthy run takes milliseconds
POLL = 0.02  # readiness has no event to wait on: re-check it this often until the deadline


def key(job_id: str) -> JobKey:
    """The job ``job_id`` of the tenant every test here writes to."""
    return JobKey("default", job_id)


FAULT_SETTINGS: dict[str, object] = {
    "storage__probe_seconds": 0.05,
    "storage__busy_timeout_ms": 50,
}


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(POLL)


# -- a real server process through one outage ------------------------------------------------


async def readyz(session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
    async with session.get("/readyz") as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


def post_event(session: aiohttp.ClientSession, job_id: str, message: str) -> Any:
    return session.post(f"/v1/jobs/{job_id}/events", json={"type": "log", "message": message})


async def collect_stream(ws: aiohttp.ClientWebSocketResponse, seqs: list[int]) -> int | None:
    """Read a WebSocket stream to its end, recording each event's seq; the close code."""
    async for message in ws:
        assert message.type == aiohttp.WSMsgType.TEXT, message
        frame = json.loads(message.data)
        if "seq" in frame:
            seqs.append(frame["seq"])
    return ws.close_code


async def ride_out_a_fault(
    server: ServerProcess,
    break_storage: Callable[[], None],
    mend_storage: Callable[[], None],
    error_part: str,
    restart: Callable[[], Awaitable[ServerProcess]],
    message_bytes: int = 100,
) -> None:
    """One outage against a running server, checked end to end (see the module docstring);
    then a second outage that ends in SIGKILL, and a restart: see ``crash_in_a_fault``."""
    refused_count = 5
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "j"}) as response:
            assert response.status == 201, await response.text()
        async with session.post("/v1/jobs", json={"job_id": "k"}) as response:
            assert response.status == 201, await response.text()
        async with post_event(session, "j", "before") as response:
            assert response.status == 201, await response.text()
        seqs: list[int] = []
        ws = await session.ws_connect("/v1/jobs/j/stream?after=0")
        reader = asyncio.create_task(collect_stream(ws, seqs))

        break_storage()
        responses = await asyncio.gather(
            *(
                session.post(
                    "/v1/jobs/j/events",
                    json={"type": "log", "message": f"{i}" * message_bytes},
                )
                for i in range(refused_count)
            )
        )
        for response in responses:
            async with response:
                body = await response.json()
                assert response.status == 503, body
                assert body["error"]["code"] == "storage_unavailable", body
                assert int(response.headers["Retry-After"]) >= 1
        status, body = await readyz(session)
        assert status == 503, body
        assert error_part in body["reason"], body
        # Reads still work, and nothing of the refused appends was written.
        assert [event["seq"] for event in await read_log(session, "j")] == [1, 2]
        assert not reader.done(), "a storage fault closed an open stream"

        mend_storage()
        # No append from here until the server says it is ready: the probe alone finds out.
        await wait_until(lambda: ready(session), "/readyz answers 200 after the fault clears")
        recovered = server.log.wait_for("storage_recovered", WAIT)
        assert recovered is not None, server.describe()
        assert recovered["stage"] == "probe", recovered
        assert recovered["refused"] == refused_count, recovered
        assert error_part in recovered["last_error"], recovered

        for message in ("after-1", "after-2"):
            async with post_event(session, "j", message) as response:
                assert response.status == 201, await response.text()
        async with session.post("/v1/jobs/j/events", json={"type": "completed"}) as response:
            assert response.status == 201, await response.text()
        assert await asyncio.wait_for(reader, WAIT) == 1000
        events = await read_log(session, "j")
        assert [event["seq"] for event in events] == [1, 2, 3, 4, 5]
        assert seqs == [1, 2, 3, 4, 5], "the stream missed or repeated an event"
        assert await get_snapshot(session, "j") == fold_log(events)

    failed = [r for r in server.lines if r.get("event") == "storage_failed"]
    assert len(failed) == 1, failed  # one line for the fault, not one per request
    assert failed[0]["stage"] in ("commit", "read"), failed
    assert failed[0]["refused"] >= 1, failed
    assert error_part in failed[0]["error"], failed
    per_request = [r for r in server.lines if r.get("code") == "storage_unavailable"]
    assert per_request == [], per_request
    await crash_in_a_fault(server, break_storage, mend_storage, restart, message_bytes)


async def crash_in_a_fault(
    server: ServerProcess,
    break_storage: Callable[[], None],
    mend_storage: Callable[[], None],
    restart: Callable[[], Awaitable[ServerProcess]],
    message_bytes: int,
) -> None:
    """ "Nothing written" checked on the file, not only on the live process: appends refused
    in a fault, then SIGKILL while the fault lasts, then a restart once it is mended. The
    new process serves exactly the logs the old one served after refusing (same events, same
    bytes), and none of the refused events."""
    async with aiohttp.ClientSession(server.url) as session:
        break_storage()
        responses = await asyncio.gather(
            *(post_event(session, "k", f"refused-{i}" + "x" * message_bytes) for i in range(3))
        )
        for response in responses:
            async with response:
                assert response.status == 503, await response.text()
        live = {job: await read_log(session, job) for job in ("j", "k")}
    server.kill(signal.SIGKILL)
    assert await server.wait_async(WAIT) == -signal.SIGKILL
    mend_storage()
    restarted = await restart()
    async with aiohttp.ClientSession(restarted.url) as session:
        for job, events in live.items():
            assert await read_log(session, job) == events, f"job {job} changed across the crash"
            assert await get_snapshot(session, job) == fold_log(events)
    refused = [e for e in live["k"] if str(e.get("message", "")).startswith("refused-")]
    assert refused == [], refused


async def ready(session: aiohttp.ClientSession) -> bool:
    return (await readyz(session))[0] == 200


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted in tmp_path: a disk that really fills up (needs CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def process_on_small_filesystem(small_filesystem: Path) -> Iterator[Launcher]:
    # Depends on the mount, so its servers are reaped before the mount is taken down.
    with launching(small_filesystem) as launcher:
        yield launcher


@pytest.mark.process
async def test_full_disk_refuses_appends_and_recovers_by_itself(
    process_on_small_filesystem: Launcher,
) -> None:
    """On a filesystem that is really full (ENOSPC, SQLITE_FULL), appends get 503
    storage_unavailable and write nothing; once space is freed, the server is ready again
    without any append, and the log and the open stream continue without a hole."""
    launcher = process_on_small_filesystem
    # No checkpoint during the test: otherwise SQLite would reuse the WAL's existing space
    # and a small commit could still fit on the full disk.
    settings: dict[str, object] = {"storage__checkpoint_seconds": 3600, **FAULT_SETTINGS}
    server = await launcher.start(**settings)
    filler = launcher.workdir / "filler"

    def fill_disk() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        # Page-sized leftovers may still fit; take them too.
        fd = os.open(filler, os.O_WRONLY | os.O_APPEND)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
        os.close(fd)

    await ride_out_a_fault(
        server,
        fill_disk,
        filler.unlink,
        "database or disk is full",
        lambda: launcher.start(**settings),
        message_bytes=8_000,
    )


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


@pytest.fixture
def immutable_files(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths to make immutable during a test; always made mutable again afterwards."""
    probe = tmp_path / "chattr-probe"
    probe.touch()
    try:
        chattr("+i", probe)
        chattr("-i", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"chattr +i is not available here: {exc}")
    paths: list[Path] = []
    try:
        yield paths
    finally:
        for path in paths:
            if path.exists():
                chattr("-i", path)


@pytest.mark.process
async def test_read_only_database_refuses_appends_and_recovers(
    jobfeed_process: Launcher, immutable_files: list[Path]
) -> None:
    """Database and WAL made immutable while the server runs (``chattr +i``: stops even
    root): the commit fails with an I/O error (SQLITE_IOERR_WRITE), appends get 503 and
    write nothing; once the files are writable again the server recovers by itself."""
    server = await jobfeed_process.start(**FAULT_SETTINGS)
    db = jobfeed_process.db_path
    files = [db, db.with_name(db.name + "-wal")]
    immutable_files.extend(files)
    await ride_out_a_fault(
        server,
        lambda: chattr("+i", *files),
        lambda: chattr("-i", *files),
        "disk I/O error",
        lambda: jobfeed_process.start(**FAULT_SETTINGS),
    )


LOCKER = """
import sqlite3, sys

conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # the write lock; in WAL mode EXCLUSIVE takes the same one
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@pytest.mark.process
async def test_lock_held_by_another_process_refuses_appends_and_recovers(
    jobfeed_process: Launcher,
) -> None:
    """Another process holds SQLite's write lock for longer than storage.busy_timeout_ms:
    appends get 503 (database is locked) and write nothing, reads and streams go on; once
    the other process lets go, the server is ready again by itself."""
    server = await jobfeed_process.start(**FAULT_SETTINGS)
    locker: subprocess.Popen[str] | None = None

    def take_lock() -> None:
        nonlocal locker
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(jobfeed_process.db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None
        assert locker.stdout.readline() == "locked\n"

    def release_lock() -> None:
        assert locker is not None
        assert locker.stdin is not None
        locker.stdin.write("\n")
        locker.stdin.close()
        assert locker.wait(WAIT) == 0
        if locker.stdout is not None:
            locker.stdout.close()  # take_lock may start another locker

    try:
        await ride_out_a_fault(
            server,
            take_lock,
            release_lock,
            "database is locked",
            lambda: jobfeed_process.start(**FAULT_SETTINGS),
        )
    finally:
        if locker is not None:
            if locker.poll() is None:
                locker.kill()
            locker.wait(WAIT)
            for pipe in (locker.stdin, locker.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()


# -- in-process: the probe, and what does not count as a fault --------------------------------


@pytest.fixture
async def store(make_config: ConfigFactory) -> AsyncIterator[Store]:
    config: Config = make_config(storage__probe_seconds=0.02)
    opened = Store(config, Hub(16, 1 << 20))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def set_max_pages(store: Store, pages: int | None = None) -> None:
    conn: Any = store._writer_conn  # fault injection on the writer's own connection
    if pages is None:
        async with conn.execute("PRAGMA page_count") as cursor:
            pages = (await cursor.fetchone())[0]
    await conn.execute(f"PRAGMA max_page_count = {pages}")


async def test_probe_fails_while_the_file_cannot_grow(store: Store) -> None:
    """While the file cannot grow (max_page_count), the probe fails too, so readiness stays
    503 however often it runs; once the file can grow, readiness clears with no append."""
    await store.writer.create_job(key("p"), None, None)
    await set_max_pages(store)
    with pytest.raises(StorageUnavailable):
        await store.writer.append(key("p"), [LogIn(type="log", message="x" * 30_000)])
    probes = store.writer.probes

    async def probed_twice() -> bool:
        return store.writer.probes >= probes + 2

    await wait_until(probed_twice, "the writer has probed twice")
    assert not store.writer.healthy
    assert await store.check_ready() is not None

    await set_max_pages(store, 1_000_000)

    async def healthy() -> bool:
        return store.writer.healthy

    await wait_until(healthy, "the probe succeeds")
    assert await store.check_ready() is None
    assert [f.seq for f in await store.read_after(key("p"), 0, 100)] == [1]
    result = await store.writer.append(key("p"), [LogIn(type="log", message="y")])
    assert result.events[0].seq == 2


async def test_no_probe_while_healthy(store: Store) -> None:
    """A healthy writer never probes: the probe costs nothing in normal operation."""
    await store.writer.create_job(key("idle"), None, None)
    await store.writer.append(key("idle"), [LogIn(type="log", message="a")])
    assert store.writer.probes == 0


async def test_chmod_on_a_running_database_is_not_a_fault(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """``chmod 0444`` on the database while the server runs changes nothing: its
    connections were opened read-write (file modes are checked at open, and root ignores
    them anyway), so appends go on and the server stays ready."""
    config = make_config()
    client = await make_client(config)
    await create_job(client, job_id="m")
    for path in config.storage.path.parent.glob("jobfeed.db*"):
        path.chmod(0o444)
    result = await append(client, "m", {"type": "log", "message": "still writable"})
    assert result["last_seq"] == 2
    response = await client.get("/readyz")
    assert response.status == 200
