"""jobfeed's Python client: report a job's progress, watch it, read its log.

    from jobfeed_client import Client

    client = Client("http://127.0.0.1:8080")
    with client.job("build-42", kind="build") as job:
        job.progress(3, 7, phase="match")
        job.log("matched requirement 3")

    for event in client.watch("build-42"):
        print(event.seq, event.type)

    for event in client.feed(prefix="build-"):  # every build's events, from now on
        print(event.job_id, event.type)

``AsyncClient`` is the same for asyncio code (``async with``, ``async for``, ``await``).
"""

from .backoff import RetryPolicy
from .client import Appended, AsyncClient
from .credentials import TokenProvider
from .errors import (
    BufferFull,
    FlushTimeout,
    Forbidden,
    InvalidRequest,
    JobDeleted,
    JobExists,
    JobfeedError,
    JobFinished,
    JobNotFound,
    LogReset,
    ProtocolViolation,
    ReporterError,
    ServerError,
    StreamClosed,
    Unauthorized,
    Unavailable,
)
from .events import Event, Snapshot
from .feed import AsyncFeed, FeedItem
from .reporter import AsyncJob, ReporterStats
from .sync import Client, Feed, Job, Watch, track
from .watch import AsyncWatch

__version__ = "0.1.0"

__all__ = [
    "Appended",
    "AsyncClient",
    "AsyncFeed",
    "AsyncJob",
    "AsyncWatch",
    "BufferFull",
    "Client",
    "Event",
    "Feed",
    "FeedItem",
    "FlushTimeout",
    "Forbidden",
    "InvalidRequest",
    "Job",
    "JobDeleted",
    "JobExists",
    "JobFinished",
    "JobNotFound",
    "JobfeedError",
    "LogReset",
    "ProtocolViolation",
    "ReporterError",
    "ReporterStats",
    "RetryPolicy",
    "ServerError",
    "Snapshot",
    "StreamClosed",
    "TokenProvider",
    "Unauthorized",
    "Unavailable",
    "Watch",
    "__version__",
    "track",
]
