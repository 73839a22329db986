"""The database's generation: which copy of the log a file holds (operations.md, "Backup and
restore"; migration 0008).

A restored log may be *behind* what clients have read, and may then grow past their offsets
again with other events. So ``jobfeed restore`` starts a new generation (``number`` + 1 and a
fresh random ``tag``), and every epoch includes it:

- a job's epoch is ``log_epoch(created id, created ts)`` in generation 0 (never restored:
  exactly what it was before generations existed, so no client is reset by the upgrade), and
  that followed by ``-g{number}-{tag}`` after a restore, for the jobs the backup held (the
  restore rewrites their snapshots) and for jobs created since (the writer adds it);
- the feed's epoch is ``g{number}-{tag}``: the tag is made once per file, so a wiped or
  replaced database also differs from this one, restored or not.

The tag is random rather than derived from the number because the file a restore replaces
may be lost (that is why one restores): two restores of the same backup must still differ.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

GENERATION_SQL = "SELECT number, tag FROM generation WHERE id = 1"


@dataclass(frozen=True, slots=True)
class Generation:
    number: int  # restores this log has been through (0: never restored)
    tag: str  # random, lower-case hex; new with each restore

    @property
    def feed_epoch(self) -> str:
        """The feed's epoch (``hello.epoch``; ``?epoch=`` on ``/v1/feed``)."""
        return f"g{self.number}-{self.tag}"

    @property
    def job_epoch_suffix(self) -> str:
        """What follows ``log_epoch(...)`` in a job's epoch: nothing in generation 0."""
        return "" if self.number == 0 else f"-{self.feed_epoch}"

    def job_epoch(self, stored_epoch: str) -> str:
        """A job's epoch in this generation, from its epoch in any generation."""
        return base_epoch(stored_epoch) + self.job_epoch_suffix


def base_epoch(epoch: str) -> str:
    """``{created id}-{created ts, hex}``: an epoch without its generation suffix."""
    return "-".join(epoch.split("-", 2)[:2])


def read_generation(conn: sqlite3.Connection) -> Generation:
    """The generation of the (migrated) database on ``conn``."""
    row = conn.execute(GENERATION_SQL).fetchone()
    if row is None:
        raise sqlite3.DatabaseError("the generation table has no row (migration 0008)")
    number, tag = row
    return Generation(int(number), tag if isinstance(tag, str) else tag.decode())


def start_next_generation(conn: sqlite3.Connection, after: int) -> Generation:
    """In an open transaction on a restored copy: make it generation ``after + 1`` with a new
    tag, and rewrite every job's epoch to it. Returns the new generation."""
    generation = Generation(after + 1, secrets.token_hex(4))
    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    conn.execute(
        "UPDATE generation SET number = ?, tag = ?, started_at = ? WHERE id = 1",
        (generation.number, generation.tag, now),
    )
    conn.create_function("jobfeed_job_epoch", 1, generation.job_epoch, deterministic=True)
    # json_set keeps every other member as stored (numbers and strings keep their text).
    conn.execute(
        "UPDATE jobs SET snapshot = json_set(snapshot, '$.epoch', "
        "jobfeed_job_epoch(json_extract(snapshot, '$.epoch'))) "
        "WHERE json_type(snapshot, '$.epoch') = 'text'"
    )
    return generation
