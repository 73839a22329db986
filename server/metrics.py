"""What ``GET /metrics`` reports: the counters the hot paths move, and the Prometheus text.

Our own tiny registry rather than prometheus-client's: an append or a stream moves a plain
integer (or one slot of a fixed-bucket histogram) in place, with no lock (one event loop), no
label lookup through a registry, and no allocation; everything else (queue depth, file and
cache sizes, open streams) is read when scraped. prometheus-client parses the output in the
tests, so the format is checked against the reference implementation.

Every label takes its values from a closed set written in the code (transports, stream kinds,
outcomes, error codes): never a job id, tenant or client address (operations.md, Metrics).
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .streams import Lag

# Append acknowledgement latency, seconds: a group commit with fsync is ~0.2-2 ms here
# (notes/measured-here.md); the top buckets catch a stalled disk.
ACK_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# Events per commit group: 1 when idle, up to storage.max_batch_events (2,000) under load.
GROUP_EVENTS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)


class Histogram:
    """A fixed-bucket histogram updated in place: ``observe`` is a bisect and two adds."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            yield f'{name}_bucket{{{labels}{sep}le="{_float(bound)}"}} {cumulative}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        braces = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{braces} {_float(self.sum)}"
        yield f"{name}_count{braces} {self.count}"


class FramesSent:
    """Event frames handed to subscribers' sockets, by where they came from: the cache of
    recent frames or a SQLite read (a replay), or pushed by the publisher to a subscriber at
    the end of the log (live). Moved once per batch, not per frame."""

    __slots__ = ("cache", "database", "push")

    def __init__(self) -> None:
        self.cache = 0
        self.database = 0
        self.push = 0


# An append request's outcome: 201 (stored), 200 (all duplicates of stored keys), a 4xx
# refusal, or a 5xx (storage fault, overload, shutdown).
APPEND_OUTCOMES = ("created", "duplicate", "refused", "failed")
TRANSPORTS = ("ws", "sse")
# Job statuses (server.models.JOB_STATUSES; not imported: this module reports, it owns none).
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
DELETE_REASONS = ("api", "retention")
KINDS = ("job", "feed")


class Metrics:
    """The counters moved where things happen; read by ``render``."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.append_requests = dict.fromkeys(APPEND_OUTCOMES, 0)
        self.append_ack_seconds = Histogram(ACK_SECONDS_BUCKETS)
        # (transport, kind) -> streams opened; (transport, kind, outcome) -> streams closed.
        self.streams_opened = {(t, k): 0 for t in TRANSPORTS for k in KINDS}
        self.streams_closed: dict[tuple[str, str, str], int] = {}
        # Error code -> refusals answered (HTTP error responses, WebSocket refusals).
        self.refusals: dict[str, int] = {}
        # Producer streams (GET /v1/ingest) admitted and ended: their difference is open.
        self.ingest_opened = 0
        self.ingest_closed = 0

    def stream_opened(self, transport: str, kind: str) -> None:
        self.streams_opened[transport, kind] += 1

    def stream_closed(self, transport: str, kind: str, outcome: str) -> None:
        key = (transport, kind, outcome)
        self.streams_closed[key] = self.streams_closed.get(key, 0) + 1

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1


@dataclass(frozen=True, slots=True)
class Sources:
    """What a scrape reads besides ``Metrics``: the writer's, hub's and files' own state at
    the moment of the scrape (this module needs none of the classes it reports on)."""

    commits: int
    events_written: int
    commit_group_events: Histogram
    writer_queue_events: int
    storage_faults: int
    storage_healthy: bool
    job_cache_jobs: int
    job_cache_bytes: int
    frame_cache_bytes: int
    feed_cache_bytes: int
    job_frames_sent: FramesSent
    feed_frames_sent: FramesSent
    database_path: str
    # Deletion and retention (server/deletion.py, server/retention.py).
    jobs_by_status: dict[str, int] = field(default_factory=dict)
    jobs_deleted: dict[str, int] = field(default_factory=dict)
    events_deleted: dict[str, int] = field(default_factory=dict)
    delete_transaction_seconds: Histogram | None = None
    retention_sweeps: int = 0
    retention_last_seconds: float | None = None
    retention_last_longest_seconds: float | None = None
    oldest_event_seconds: float | None = None
    # The worker-lost watchdog (server/watchdog.py); 0 when it is off.
    jobs_lost: int = 0
    watched_jobs: int = 0
    # (transport, kind) -> the open streams' lag at this scrape (StreamRegistry.lag).
    subscriber_lag: Mapping[tuple[str, str], Lag] = field(default_factory=dict)


def render(metrics: Metrics, sources: Sources) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("jobfeed_build_info", "gauge", "The running version (always 1).")
    out.append(f'jobfeed_build_info{{version="{__version__}"}} 1')
    family("jobfeed_start_time_seconds", "gauge", "When the process started, Unix time.")
    out.append(f"jobfeed_start_time_seconds {_float(metrics.started_at)}")

    family("jobfeed_append_requests_total", "counter", "Append requests answered, by outcome.")
    for outcome, count in metrics.append_requests.items():
        out.append(f'jobfeed_append_requests_total{{outcome="{outcome}"}} {count}')
    family("jobfeed_events_appended_total", "counter", "Events committed to the log.")
    out.append(f"jobfeed_events_appended_total {sources.events_written}")
    family("jobfeed_commits_total", "counter", "Group transactions committed by the writer.")
    out.append(f"jobfeed_commits_total {sources.commits}")
    family(
        "jobfeed_append_ack_seconds",
        "histogram",
        "Time from an append request's body parsed to its answer ready (queue + commit).",
    )
    out.extend(metrics.append_ack_seconds.lines("jobfeed_append_ack_seconds"))
    family("jobfeed_commit_group_events", "histogram", "Events written per group commit.")
    out.extend(sources.commit_group_events.lines("jobfeed_commit_group_events"))
    family("jobfeed_writer_queue_events", "gauge", "Events queued for the writer.")
    out.append(f"jobfeed_writer_queue_events {sources.writer_queue_events}")
    family("jobfeed_storage_faults_total", "counter", "Failed writes (commits and probes).")
    out.append(f"jobfeed_storage_faults_total {sources.storage_faults}")
    family("jobfeed_storage_healthy", "gauge", "1 while the last write succeeded, else 0.")
    out.append(f"jobfeed_storage_healthy {int(sources.storage_healthy)}")

    family("jobfeed_database_bytes", "gauge", "Size of the SQLite database file.")
    out.append(f"jobfeed_database_bytes {_size(sources.database_path)}")
    family("jobfeed_wal_bytes", "gauge", "Size of the SQLite -wal file.")
    out.append(f"jobfeed_wal_bytes {_size(sources.database_path + '-wal')}")
    family("jobfeed_job_cache_jobs", "gauge", "Job snapshots held by the writer's cache.")
    out.append(f"jobfeed_job_cache_jobs {sources.job_cache_jobs}")
    family("jobfeed_job_cache_bytes", "gauge", "Measured bytes of the writer's job cache.")
    out.append(f"jobfeed_job_cache_bytes {sources.job_cache_bytes}")
    family("jobfeed_frame_cache_bytes", "gauge", "Bytes of serialized frames cached, by cache.")
    out.append(f'jobfeed_frame_cache_bytes{{cache="job"}} {sources.frame_cache_bytes}')
    out.append(f'jobfeed_frame_cache_bytes{{cache="feed"}} {sources.feed_cache_bytes}')

    closed_by_stream: dict[tuple[str, str], int] = {}
    for (transport, kind, _), count in metrics.streams_closed.items():
        closed_by_stream[transport, kind] = closed_by_stream.get((transport, kind), 0) + count
    family(
        "jobfeed_frames_sent_total",
        "counter",
        "Event frames handed to subscribers, by stream kind and source (cache, database: "
        "replay; push: live).",
    )
    for kind, sent in (("job", sources.job_frames_sent), ("feed", sources.feed_frames_sent)):
        for source in FramesSent.__slots__:
            count = getattr(sent, source)
            out.append(f'jobfeed_frames_sent_total{{kind="{kind}",source="{source}"}} {count}')
    family("jobfeed_streams_open", "gauge", "Open streams, by transport and kind.")
    for (transport, kind), opened in metrics.streams_opened.items():
        open_now = opened - closed_by_stream.get((transport, kind), 0)
        out.append(f'jobfeed_streams_open{{transport="{transport}",kind="{kind}"}} {open_now}')
    family("jobfeed_streams_opened_total", "counter", "Streams opened, by transport and kind.")
    for (transport, kind), opened in metrics.streams_opened.items():
        labels = f'transport="{transport}",kind="{kind}"'
        out.append(f"jobfeed_streams_opened_total{{{labels}}} {opened}")
    family(
        "jobfeed_stream_closes_total",
        "counter",
        "Streams ended, by transport, kind and outcome (done, client_gone, send_timeout, ...).",
    )
    for (transport, kind, outcome), count in sorted(metrics.streams_closed.items()):
        labels = f'transport="{transport}",kind="{kind}",outcome="{outcome}"'
        out.append(f"jobfeed_stream_closes_total{{{labels}}} {count}")
    family("jobfeed_ingest_connections_open", "gauge", "Open producer streams (/v1/ingest).")
    out.append(f"jobfeed_ingest_connections_open {metrics.ingest_opened - metrics.ingest_closed}")
    family(
        "jobfeed_subscribers_behind",
        "gauge",
        "Open streams with committed events not yet handed to their socket, at the scrape.",
    )
    lag_lines: list[str] = []
    for transport in TRANSPORTS:
        for kind in KINDS:
            lag = sources.subscriber_lag.get((transport, kind))
            labels = f'transport="{transport}",kind="{kind}"'
            behind, events, most = (lag.behind, lag.events, lag.most) if lag else (0, 0, 0)
            out.append(f"jobfeed_subscribers_behind{{{labels}}} {behind}")
            lag_lines.append(f"jobfeed_subscriber_lag_events{{{labels}}} {events}")
            lag_lines.append(f"jobfeed_subscriber_lag_max_events{{{labels}}} {most}")
    family(
        "jobfeed_subscriber_lag_events",
        "gauge",
        "Events committed but not yet handed to open streams' sockets, summed over them "
        "(job streams: the job's seqs; feeds: ids), at the scrape.",
    )
    out.extend(line for line in lag_lines if line.startswith("jobfeed_subscriber_lag_events{"))
    family(
        "jobfeed_subscriber_lag_max_events",
        "gauge",
        "The most events any one open stream is behind the log, at the scrape.",
    )
    out.extend(line for line in lag_lines if line.startswith("jobfeed_subscriber_lag_max_"))
    family("jobfeed_refusals_total", "counter", "Requests and streams refused, by error code.")
    for code, count in sorted(metrics.refusals.items()):
        out.append(f'jobfeed_refusals_total{{code="{code}"}} {count}')
    _render_retention(out, family, sources)
    family(
        "jobfeed_jobs_lost_total",
        "counter",
        "Jobs the watchdog failed as worker_lost (silent past their heartbeat_timeout).",
    )
    out.append(f"jobfeed_jobs_lost_total {sources.jobs_lost}")
    family("jobfeed_watched_jobs", "gauge", "Unfinished jobs with a heartbeat_timeout.")
    out.append(f"jobfeed_watched_jobs {sources.watched_jobs}")
    out.append("")
    return "\n".join(out)


def _render_retention(
    out: list[str], family: Callable[[str, str, str], None], sources: Sources
) -> None:
    """Jobs by status, deletions and the retention sweep."""
    family(
        "jobfeed_jobs",
        "gauge",
        "Jobs in the log, by status (counted at start, then kept up to date by the writer).",
    )
    for status in JOB_STATUSES:
        out.append(f'jobfeed_jobs{{status="{status}"}} {sources.jobs_by_status.get(status, 0)}')
    family("jobfeed_jobs_deleted_total", "counter", "Jobs deleted, by reason (api, retention).")
    for reason in DELETE_REASONS:
        count = sources.jobs_deleted.get(reason, 0)
        out.append(f'jobfeed_jobs_deleted_total{{reason="{reason}"}} {count}')
    family("jobfeed_events_deleted_total", "counter", "Events deleted, by reason.")
    for reason in DELETE_REASONS:
        count = sources.events_deleted.get(reason, 0)
        out.append(f'jobfeed_events_deleted_total{{reason="{reason}"}} {count}')
    if sources.delete_transaction_seconds is not None:
        family(
            "jobfeed_delete_transaction_seconds",
            "histogram",
            "Time one deletion transaction held the writer (DELETE, a retention batch).",
        )
        out.extend(sources.delete_transaction_seconds.lines("jobfeed_delete_transaction_seconds"))
    family("jobfeed_retention_sweeps_total", "counter", "Retention sweeps completed.")
    out.append(f"jobfeed_retention_sweeps_total {sources.retention_sweeps}")
    # These three have no value before a sweep (or in an empty log): the family is still
    # declared, with no sample, so that dashboards and alerts can name it.
    family("jobfeed_retention_last_sweep_seconds", "gauge", "How long the last sweep took.")
    if sources.retention_last_seconds is not None:
        out.append(f"jobfeed_retention_last_sweep_seconds {_float(sources.retention_last_seconds)}")
    family(
        "jobfeed_retention_last_sweep_longest_transaction_seconds",
        "gauge",
        "The longest transaction (deletion or vacuum step) of the last sweep.",
    )
    if sources.retention_last_longest_seconds is not None:
        longest = _float(sources.retention_last_longest_seconds)
        out.append(f"jobfeed_retention_last_sweep_longest_transaction_seconds {longest}")
    family(
        "jobfeed_retention_horizon_seconds",
        "gauge",
        "The retention horizon: ts of the oldest event kept, Unix time (no sample: no event).",
    )
    if sources.oldest_event_seconds is not None:
        out.append(f"jobfeed_retention_horizon_seconds {_float(sources.oldest_event_seconds)}")


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _float(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"
