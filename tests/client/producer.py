"""A worker for tests/client/test_producer_restart.py: reports ``steps`` steps of a job with
the sync client, printing ``step N`` once each step is acknowledged, so the test can kill it
at a chosen point with that much already stored and the next request on its way.

    python -m tests.client.producer URL JOB_ID RUN_KEY STEPS
"""

from __future__ import annotations

import sys

from jobfeed_client import Client, RetryPolicy


def main(url: str, job_id: str, run_key: str, steps: int) -> None:
    with (
        Client(url, flush_interval=0, retry=RetryPolicy(base=0.02, cap=0.2)) as client,
        client.job(job_id, kind="restartable", run_key=run_key) as job,
    ):
        for i in range(steps):
            job.log(f"step {i}")
            job.progress(i + 1, steps, phase="odd" if i % 2 else "even")
            job.event("step.done", data={"i": i})
            job.flush()
            print(f"step {i}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
