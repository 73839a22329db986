"""The ``jobfeed`` command: ``serve``, ``migrate``, ``vacuum``, ``token``, ``backup`` and
``restore`` (``--help`` shows
``DESCRIPTION``); ``tail``, ``feed``, ``jobs`` and ``export`` are the Python client's
(clients/python), run from here when it is installed.

Start-up problems (bad config, unwritable or corrupt database, a schema from a newer jobfeed,
port in use) end the process with one clear line on stderr and exit status 2 (config) or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import os
import resource
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from . import __version__
from .app import create_app
from .auth import READ, Authenticator, mint_token
from .backup import BackupError, backup, restore, timed
from .config import Config, ConfigError, ensure_storage_dir, load_config
from .dblock import DatabaseInUse, DatabaseLock
from .handlers import scrape
from .limits import ConnectionCappedRunner
from .logs import configure_logging
from .migrate import MigrationError, apply_migrations, vacuum_incremental
from .store import StorageCorrupt, check_integrity

log = structlog.get_logger("jobfeed")
# Plain text for --help (the module docstring is reStructuredText, for readers of the code).
DESCRIPTION = (
    "A durable job-progress log: producers append events over HTTP; subscribers follow a "
    "job over WebSocket or Server-Sent Events, from any offset."
)

# An idle kept-alive connection is closed after this long (aiohttp's run_app default; its
# low-level default, an hour, would let idle clients hold connection slots).
KEEPALIVE_SECONDS = 75.0


CLIENT_COMMANDS = ("tail", "feed", "jobs", "export")
BACKUP_NICENESS = 10  # added to `jobfeed backup`'s CPU niceness


def main(argv: list[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else argv
    if args_given and args_given[0] in CLIENT_COMMANDS:
        return _client_command(args_given)
    parser = argparse.ArgumentParser(
        prog="jobfeed",
        description=DESCRIPTION,
        epilog="Client commands (pip install 'jobfeed-client[cli]'): " + ", ".join(CLIENT_COMMANDS),
    )
    parser.add_argument("--version", action="version", version=f"jobfeed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the server"),
        ("migrate", "apply schema migrations"),
        ("vacuum", "rebuild the database so that retention shrinks the file (server stopped)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, default=None, help="path to config.toml")
    token = commands.add_parser(
        "token", help="mint a development token from the configured secret (auth.secrets)"
    )
    token.add_argument("--config", type=Path, default=None, help="path to config.toml")
    token.add_argument("--tenant", default="default", help="the tenant claim")
    token.add_argument("--scope", default=READ, help='space-separated, e.g. "jobs:read jobs:write"')
    token.add_argument(
        "--jobs", action="append", default=None, help="a job selector (id or prefix*); repeatable"
    )
    token.add_argument("--sub", default="jobfeed-cli", help="the sub claim")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until it expires")
    backup_cmd = commands.add_parser(
        "backup", help="copy the database (also while the server serves) to DEST and check it"
    )
    backup_cmd.add_argument("--config", type=Path, default=None, help="path to config.toml")
    backup_cmd.add_argument("--force", action="store_true", help="replace DEST if it exists")
    backup_cmd.add_argument("dest", type=Path, metavar="DEST", help="the backup file to write")
    restore_cmd = commands.add_parser(
        "restore", help="put a backup in place of the database (server stopped): a new generation"
    )
    restore_cmd.add_argument("--config", type=Path, default=None, help="path to config.toml")
    restore_cmd.add_argument("src", type=Path, metavar="SRC", help="the backup file to restore")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
        if args.command == "token":
            sys.stdout.write(_mint(config, args) + "\n")
            return 0
        ensure_storage_dir(config)
        if args.command == "serve":
            refuse_anonymous_remote(config)
            Authenticator(config.auth)  # unreadable or unusable public keys: one line, exit 2
    except ConfigError as exc:
        sys.stderr.write(f"jobfeed: {exc}\n")
        return 2
    if args.command in ("backup", "restore"):
        return _backup_command(config, args)
    configure_logging(config.log)
    try:
        if args.command == "migrate":
            _migrate(config)
            return 0
        if args.command == "vacuum":
            _vacuum(config)
            return 0
        _run(_serve(config, args.config), _loop_factory(config))
    except (DatabaseInUse, MigrationError, StorageCorrupt, sqlite3.DatabaseError, OSError) as exc:
        sys.stderr.write(f"jobfeed: cannot start: {exc}\n")
        return 1
    return 0


def _client_command(argv: list[str]) -> int:
    try:
        from jobfeed_client.cli import main as client_main
    except ImportError:
        sys.stderr.write(
            f"jobfeed: `{argv[0]}` needs the Python client: "
            "pip install 'jobfeed-client[cli]' (from clients/python in the repository)\n"
        )
        return 1
    return client_main(argv, prog="jobfeed")


def _migrate(config: Config) -> None:
    """What ``serve`` does before it serves: refuse a file in use or damaged, then migrate.

    Never under a running server: its writer and readers hold the schema it started with.
    """
    lock = DatabaseLock(config.storage.path)
    lock.acquire()
    try:
        if config.storage.integrity_check:
            check_integrity(config.storage.path)
        applied = apply_migrations(config.storage.path)
    finally:
        lock.release()
    log.info("migrated", path=str(config.storage.path), applied=applied)


def _backup_command(config: Config, args: argparse.Namespace) -> int:
    """``backup`` and ``restore``: one line on stdout saying what the file holds, or one
    line on stderr and exit status 1."""
    started = time.monotonic()
    db_path = config.storage.path
    try:
        if args.command == "backup":
            # Background work beside a server that may share its cores: the copy and its
            # check take a core for seconds; at nice 0 on 2 cores that doubled the appends'
            # ack p99 (docs/performance.md, W1backup).
            os.nice(BACKUP_NICENESS)
            contents = backup(db_path, args.dest, force=args.force)
            sys.stdout.write(
                f"jobfeed: backed up {db_path} to {args.dest} in {timed(started)}: "
                f"{contents.describe()}\n"
            )
            return 0
        contents, _ = restore(db_path, args.src)
    except (BackupError, DatabaseInUse, OSError) as exc:
        sys.stderr.write(f"jobfeed: {args.command} failed: {exc}\n")
        return 1
    sys.stdout.write(
        f"jobfeed: restored {args.src} to {db_path} in {timed(started)}: "
        f"{contents.describe()}; clients resuming an epoch from before get log_reset\n"
    )
    return 0


def _vacuum(config: Config) -> None:
    """Migrate, then rebuild the file with ``auto_vacuum = INCREMENTAL`` (docs/operations.md,
    "Deleting jobs and retention"); never under a running server (the lock refuses)."""
    lock = DatabaseLock(config.storage.path)
    lock.acquire()
    try:
        if config.storage.integrity_check:
            check_integrity(config.storage.path)
        apply_migrations(config.storage.path)
        before, after = vacuum_incremental(config.storage.path)
    finally:
        lock.release()
    log.info("vacuumed", path=str(config.storage.path), bytes_before=before, bytes_after=after)


def _mint(config: Config, args: argparse.Namespace) -> str:
    if not config.auth.secrets:
        raise ConfigError("jobfeed token needs auth.secrets (e.g. JOBFEED_AUTH__SECRETS)")
    jobs = None
    if args.jobs is not None:
        jobs = [job for value in args.jobs for job in value.split(",") if job]
    return mint_token(
        config.auth.secrets[0].get_secret_value(),
        tenant=args.tenant,
        scope=args.scope,
        jobs=jobs,
        sub=args.sub,
        ttl_seconds=args.ttl,
        audience=config.auth.audience or None,
        issuer=config.auth.issuer or None,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def refuse_anonymous_remote(config: Config) -> None:
    """Secure by default: anonymous clients only on a loopback address (auth.md)."""
    auth, host = config.auth, config.server.host
    if auth.mode == "none" and not auth.allow_anonymous_remote and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve anonymous clients on {host or 'all addresses'}: set "
            "auth.mode = 'jwt' with auth.secrets (JOBFEED_AUTH__MODE=jwt, "
            "JOBFEED_AUTH__SECRETS='[\"...\"]'), or auth.allow_anonymous_remote = true "
            "if anyone who can reach this address may read and write every job"
        )


def _loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    choice = config.server.event_loop
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("server.event_loop = 'uvloop' but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def _run(
    coro: Coroutine[Any, Any, None], loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(coro)


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the fan-out path.

    Waking thousands of waiting subscribers allocates thousands of loop handles; with the
    default gen-0 threshold (700) that triggered collections scanning every open connection,
    75 % of the main thread when one event went to 10,000 sockets (docs/performance.md).
    Start-up objects are frozen out of collection, and young collections run less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _serve(config: Config, config_path: Path | None) -> None:
    app = create_app(config, config_path)
    runner = ConnectionCappedRunner(
        app,
        max_connections=config.server.max_connections,
        header_timeout=config.server.header_timeout,
        access_log=None,  # our middleware writes one structured line per request
        handle_signals=False,
        # aiohttp waits this long for the requests in flight, then cancels them and waits
        # as long again at most: half each keeps the whole shutdown within the setting.
        # The streams get the same half, concurrently (server.app.ended_at_shutdown).
        shutdown_timeout=config.server.shutdown_timeout / 2,
        keepalive_timeout=KEEPALIVE_SECONDS,
    )
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, backlog=1024)
        await site.start()
        _tune_gc()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for host, port, *_ in runner.addresses:
            log.info(
                "listening",
                host=host,
                port=port,
                pid=os.getpid(),
                db=str(config.storage.path),
                durability=config.storage.durability,
                loop=type(asyncio.get_running_loop()).__module__,
                fd_limit=soft,
                fd_limit_hard=hard,
                max_connections=config.server.max_connections,
                auth=config.auth.mode,
            )
        if config.metrics.enabled and config.metrics.host:
            metrics_runner = web.AppRunner(
                scrape.metrics_app(app), access_log=None, handle_signals=False
            )
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, config.metrics.host, config.metrics.port).start()
            for host, port, *_ in metrics_runner.addresses:
                log.info("metrics_listening", host=host, port=port)
        if config.server.max_connections > soft:
            # Past the fd limit accept() fails before the cap can answer 503 (docs/operations.md).
            log.warning(
                "max_connections_above_fd_limit",
                max_connections=config.server.max_connections,
                fd_limit=soft,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting_down", timeout=config.server.shutdown_timeout)
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
