"""``jobfeed tail | feed | jobs | export``: watch a job live, follow many jobs' events, list
jobs, dump a job's log.

The server's ``jobfeed`` command hands these subcommands to ``main`` when this package is
installed; ``jobfeed-client`` (and ``python -m jobfeed_client``) run it directly.

Exit status: 0 the job completed (or the command succeeded), 1 it failed, 2 it was
cancelled, 3 no such job, 4 any other error (server unreachable, a refusal), 64 a usage
error, 130 interrupted (``feed`` never ends by itself: 130 is how it ends, or 4). (64, not
argparse's usual 2, so that 2 only ever means cancelled.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .client import AsyncClient
from .errors import JobfeedError, JobNotFound, LogReset
from .events import Event, Snapshot
from .watch import AsyncWatch

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_NOT_FOUND, EXIT_ERROR = 0, 1, 2, 3, 4
EXIT_USAGE, EXIT_INTERRUPTED = 64, 130
EXIT_BY_STATUS = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
LEVEL_STYLES = {"debug": "dim", "info": "default", "warning": "yellow", "error": "bold red"}
COMMANDS = ("tail", "feed", "jobs", "export")
TOKEN_COMMAND_TIMEOUT = 60.0  # seconds for --token-command to print a token


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "jobfeed") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Watch and read jobfeed jobs.")
    common = _Parser(add_help=False)
    common.add_argument("--url", help="server URL (default: $JOBFEED_URL or http://127.0.0.1:8080)")
    common.add_argument("--token", help="bearer token (default: $JOBFEED_TOKEN)")
    common.add_argument(
        "--token-command",
        metavar="CMD",
        help="a shell command that prints a fresh token, run at start (unless --token is "
        "given) and whenever the token expires (default: $JOBFEED_TOKEN_COMMAND)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tail = commands.add_parser(
        "tail",
        parents=[common],
        help="follow a job live: a progress bar, log lines above it; resumes by itself",
        description="Follow a job until it finishes. Exit 0 completed, 1 failed, "
        "2 cancelled, 3 not found.",
    )
    tail.add_argument("job_id")
    tail.add_argument("--after", type=int, default=0, help="start after this seq (default 0)")
    tail.add_argument("--json", action="store_true", help="print each event as one JSON line")
    tail.add_argument(
        "--sse", action="store_true", help="use Server-Sent Events instead of a WebSocket"
    )

    feed = commands.add_parser(
        "feed",
        parents=[common],
        help="follow the events of many jobs, one line each; resumes by itself",
        description="Print the events of every matching job as they are committed, one line "
        "each (time, job, type, a summary), until interrupted. Filters combine with AND; "
        "--job, --kind and --type may repeat (OR).",
    )
    feed.add_argument("--prefix", help="job ids starting with this")
    feed.add_argument("--job", action="append", help="this job (repeatable)")
    feed.add_argument("--kind", action="append", help="jobs of this kind (repeatable)")
    feed.add_argument("--type", action="append", help="events of this type (repeatable)")
    feed.add_argument(
        "--after",
        type=int,
        default=None,
        help="start after this event id (0: the whole log; default: from now)",
    )
    feed.add_argument("--json", action="store_true", help="print each event as one JSON line")
    feed.add_argument(
        "--sse", action="store_true", help="use Server-Sent Events instead of a WebSocket"
    )

    jobs = commands.add_parser("jobs", parents=[common], help="list jobs, newest first")
    jobs.add_argument("--status", choices=["queued", "running", "completed", "failed", "cancelled"])
    jobs.add_argument("--kind")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    jobs.add_argument("--json", action="store_true", help="one snapshot per line")

    export = commands.add_parser("export", parents=[common], help="a job's log as NDJSON on stdout")
    export.add_argument("job_id")
    export.add_argument("--after", type=int, default=0, help="start after this seq (default 0)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "jobfeed-client") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def command_token_provider(command: str) -> Callable[[], str]:
    """A token provider that runs ``command`` in a shell and takes its output (trimmed)."""

    def run() -> str:
        try:
            done = subprocess.run(
                command,
                shell=True,  # the user's own command line, as they would type it
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=TOKEN_COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise JobfeedError(
                f"--token-command did not finish within {TOKEN_COMMAND_TIMEOUT:g} s"
            ) from None
        if done.returncode != 0:
            detail = done.stderr.strip()[-300:]
            raise JobfeedError(f"--token-command exited with {done.returncode}: {detail}")
        token = done.stdout.strip()
        if not token:
            raise JobfeedError("--token-command printed no token")
        return token

    return run


async def _run(args: argparse.Namespace) -> int:
    command = args.token_command or os.environ.get("JOBFEED_TOKEN_COMMAND") or None
    provider = command_token_provider(command) if command else None
    async with AsyncClient(args.url, token=args.token, token_provider=provider) as client:
        try:
            if args.command == "tail":
                return await _tail(client, args)
            if args.command == "feed":
                return await _feed(client, args)
            if args.command == "jobs":
                return await _jobs(client, args)
            return await _export(client, args)
        except JobNotFound:
            _error(f"job {args.job_id} not found")
            return EXIT_NOT_FOUND
        except LogReset as exc:
            _error(f"{exc} (run again with --after 0)")
            return EXIT_ERROR
        except JobfeedError as exc:
            _error(str(exc))
            return EXIT_ERROR
        except ModuleNotFoundError as exc:
            if exc.name != "rich":
                raise
            _error("this view needs rich: pip install 'jobfeed-client[cli]' (or use --json)")
            return EXIT_ERROR


def _error(message: str) -> None:
    sys.stderr.write(f"jobfeed: {message}\n")
    sys.stderr.flush()


async def _export(client: AsyncClient, args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    async for line in client.export(args.job_id, after=args.after):
        out.write(line)
    out.flush()
    return EXIT_OK


async def _jobs(client: AsyncClient, args: argparse.Namespace) -> int:
    found = [s async for s in client.jobs(status=args.status, kind=args.kind, limit=args.limit)]
    if args.json:
        for snapshot in found:
            sys.stdout.write(json.dumps(snapshot.to_dict(), separators=(",", ":")) + "\n")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("JOB", "KIND", "STATUS", "PROGRESS", "PHASE", "UPDATED"):
        table.add_column(column, no_wrap=True)  # ids and times are read whole or not at all
    table.add_column("MESSAGE", overflow="fold")
    for s in found:
        table.add_row(
            s.job_id,
            s.kind or "",
            f"[{_status_style(s.status)}]{s.status}[/]",
            "" if s.progress is None else f"{s.progress:.0f}%",
            s.phase or "",
            s.updated_at[:19].replace("T", " "),
            s.message or "",
        )
    Console().print(table)
    return EXIT_OK


async def _tail(client: AsyncClient, args: argparse.Namespace) -> int:
    watch = client.watch(
        args.job_id, after=args.after, transport="sse" if args.sse else "websocket"
    )
    if args.json:
        last: Event | None = None
        async for event in watch:
            last = event
            sys.stdout.write(json.dumps(event.raw, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        return await _exit_for(client, watch, last)
    return await _tail_live(client, watch)


async def _feed(client: AsyncClient, args: argparse.Namespace) -> int:
    """One line per event, flushed at once (a pipe reader sees it live); runs until
    interrupted or refused."""
    if args.after is not None and args.after < 0:
        _error("--after must be >= 0")
        return EXIT_USAGE
    feed = client.feed(
        after=args.after,
        job=args.job,
        prefix=args.prefix,
        kind=args.kind,
        type=args.type,
        transport="sse" if args.sse else "websocket",
    )
    out = sys.stdout
    async for item in feed:
        if not isinstance(item, Event):
            continue  # snapshots are not asked for
        if args.json:
            out.write(json.dumps(item.raw, separators=(",", ":")) + "\n")
        else:
            out.write(feed_line(item) + "\n")
        out.flush()
    return EXIT_OK  # not reached: a feed never ends by itself


def feed_line(event: Event) -> str:
    """``08:23:06 build-42 progress 40% test 4/10``: time (UTC), job, type, a summary."""
    line = f"{event.ts[11:19]} {event.job_id} {event.type}"
    summary = event_summary(event)
    return f"{line} {summary}" if summary else line


def event_summary(event: Event) -> str:
    """A few words on what the event says, on one line."""
    parts: list[str] = []
    if event.type == "created":
        parts = [event.kind or ""]
    elif event.type == "progress":
        if event.progress is not None:
            parts.append(f"{event.progress:.0f}%")
        parts.append(event.phase or "")
        if event.current is not None:
            parts.append(f"{event.current}/{event.total}" if event.total else str(event.current))
        parts.append(event.message or "")
    elif event.type == "log":
        parts = [(event.level or "info").upper(), event.message or ""]
    elif event.type == "completed":
        parts = ["" if event.result is None else json.dumps(event.result), event.message or ""]
    elif event.type == "failed":
        parts = [str((event.error or {}).get("message", ""))]
    elif event.type == "cancelled":
        parts = [event.reason or ""]
    else:
        parts = [event.message or (json.dumps(event.data) if event.data else "")]
    text = " ".join(part for part in parts if part)
    return " ".join(text.split())[:200]  # one line, whatever the message holds


async def _exit_for(client: AsyncClient, watch: AsyncWatch, last: Event | None) -> int:
    """By how the job ended: its terminal event, or (nothing new after ``--after``) its
    snapshot's status."""
    if last is not None and last.terminal:
        status = last.type
    else:
        status = (await client.get_job(watch.job_id)).status
    return EXIT_BY_STATUS.get(status, EXIT_OK)


async def _tail_live(client: AsyncClient, watch: AsyncWatch) -> int:
    """A rich progress bar (percent, phase, message, connection state) with log lines and
    custom events printed above it."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn
    from rich.text import Text

    class StateColumn(ProgressColumn):
        """The watcher's connection state, read at every refresh (it changes while the
        watcher waits to resume, when no event arrives to trigger an update)."""

        def render(self, task: Any) -> Text:
            if watch.state == "waiting":
                return Text(f"reconnecting ({watch.resumes})", style="yellow")
            if watch.state == "connecting":
                return Text("connecting", style="dim")
            return Text(
                str(task.fields.get("status", "")),
                style=_status_style(task.fields.get("status", "")),
            )

    console = Console(highlight=False)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        StateColumn(),
        TextColumn("{task.fields[estimate]}"),
        TextColumn("{task.fields[phase]}", style="cyan"),
        TextColumn("{task.fields[message]}"),
        console=console,
        refresh_per_second=8,
    )
    task = progress.add_task(watch.job_id, total=100, status="", estimate="", phase="", message="")
    last: Event | None = None
    with progress:
        async for event in watch:
            last = event
            _print_event(console, event)
            snapshot = watch.snapshot
            if snapshot is not None:
                progress.update(
                    task,
                    completed=snapshot.progress or 0,
                    status=snapshot.status,
                    estimate=estimate_text(snapshot),
                    phase=snapshot.phase or "",
                    message=snapshot.message or "",
                )
            elif event.type == "progress":  # started mid-log (--after): the event's own fields
                fields: dict[str, Any] = {
                    k: event.raw[k] for k in ("phase", "message") if k in event.raw
                }
                if event.progress is not None:
                    fields["completed"] = event.progress
                progress.update(task, status="running", **fields)
    _print_outcome(console, last)
    return await _exit_for(client, watch, last)


def estimate_text(snapshot: Snapshot) -> str:
    """The server's estimate for a running job (docs/protocol.md, "Rate and ETA"), as of its
    last event: "0:42 left · 10/s"; "" when there is none."""
    if snapshot.status != "running":
        return ""
    parts = []
    if snapshot.eta_seconds is not None:
        parts.append(f"{format_eta(snapshot.eta_seconds)} left")
    if snapshot.rate is not None:
        parts.append(format_rate(snapshot.rate))
    return " · ".join(parts)


def format_eta(seconds: float) -> str:
    """Seconds left as "0:07", "2:31", "1:05:00", or "3 days" (as the browser card)."""
    if seconds >= 2 * 86400:
        return f"{round(seconds / 86400)} days"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def format_rate(rate: float) -> str:
    """Units of ``current`` per second as "12.5/s", "3/min" or "0.5/h" (3 digits)."""
    if rate >= 1 or rate == 0:
        value, unit = rate, "s"
    elif rate * 60 >= 1:
        value, unit = rate * 60, "min"
    else:
        value, unit = rate * 3600, "h"
    return f"{value:,.0f}/{unit}" if value >= 100 else f"{value:.3g}/{unit}"


def _print_event(console: Any, event: Event) -> None:
    clock = event.ts[11:19]
    if event.type == "log":
        level = event.level or "info"
        console.print(
            f"[dim]{clock}[/] [{LEVEL_STYLES.get(level, 'default')}]{level.upper():<7} "
            f"{_escape(event.message or '')}[/]"
        )
    elif event.type not in ("progress", "created", "completed", "failed", "cancelled"):
        detail = event.message or (json.dumps(event.data) if event.data else "")
        console.print(f"[dim]{clock}[/] [magenta]{event.type}[/] {_escape(detail)}")


def _print_outcome(console: Any, last: Event | None) -> None:
    if last is None or not last.terminal:
        return
    if last.type == "completed":
        result = "" if last.result is None else f" {json.dumps(last.result)}"
        console.print(f"[bold green]completed[/]{_escape(result)}")
    elif last.type == "failed":
        message = (last.error or {}).get("message", "")
        console.print(f"[bold red]failed[/] {_escape(str(message))}")
    else:
        console.print(f"[bold yellow]cancelled[/] {_escape(last.reason or '')}")


def _status_style(status: str) -> str:
    return {
        "completed": "green",
        "failed": "red",
        "cancelled": "yellow",
        "running": "blue",
    }.get(status, "dim")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    sys.exit(main())
