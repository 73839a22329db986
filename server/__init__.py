"""jobfeed: a durable job-progress log that streams to late and reconnecting subscribers."""

__version__ = "0.1.0"
