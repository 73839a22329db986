# syntax=docker/dockerfile:1
# jobfeed: a durable job-progress log. Build: docker build -t jobfeed .
# Run:   docker run -d --name jobfeed -p 8080:8080 -v jobfeed-data:/data \
#          -e JOBFEED_AUTH__MODE=jwt -e JOBFEED_AUTH__SECRETS='["<32+ random characters>"]' jobfeed
# It listens on 0.0.0.0: without a secret (or JOBFEED_AUTH__ALLOW_ANONYMOUS_REMOTE=true) it
# refuses to start, saying so in one line (README.md, "Exposing jobfeed"; docs/security.md).
# See README.md ("Running in a container") and docs/operations.md.

# --- build: a virtualenv with jobfeed and its pinned dependencies -----------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel needs. server/migrations is a symlink to ../migrations, so both are copied.
COPY pyproject.toml constraints.txt README.md ./
COPY migrations ./migrations
COPY server ./server
# A regular (not editable) install: the image does not need /src at run time.
RUN python -m venv /opt/jobfeed \
 && /opt/jobfeed/bin/pip install -c constraints.txt . \
 && /opt/jobfeed/bin/jobfeed --version

# --- run ----------------------------------------------------------------------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="jobfeed" \
      org.opencontainers.image.description="A durable job-progress log that streams to late and reconnecting subscribers"
# shutdown_timeout 8 s: below `docker stop`'s default 10 s grace, so a stop never ends in SIGKILL
# (docs/operations.md). Raise both together.
ENV PATH=/opt/jobfeed/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    JOBFEED_SERVER__HOST=0.0.0.0 \
    JOBFEED_SERVER__PORT=8080 \
    JOBFEED_SERVER__SHUTDOWN_TIMEOUT=8 \
    JOBFEED_STORAGE__PATH=/data/jobfeed.db \
    JOBFEED_LOG__FORMAT=json
RUN useradd --system --user-group --uid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin jobfeed \
 && mkdir -p /data /etc/jobfeed \
 && chown jobfeed:jobfeed /data
COPY --from=build /opt/jobfeed /opt/jobfeed
COPY config.toml /etc/jobfeed/config.toml
# The database, its -wal and -shm files. A named volume inherits the ownership above; a bind
# mount must be writable by uid 10001.
VOLUME ["/data"]
USER jobfeed
EXPOSE 8080
# The slim image has no curl: ask /healthz with the standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('JOBFEED_SERVER__PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
# SIGTERM: streams close with 1001, queued appends are committed, exit 0 (docs/operations.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["jobfeed"]
CMD ["serve", "--config", "/etc/jobfeed/config.toml"]
