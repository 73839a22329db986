"""The client's exceptions: one small class per situation a caller handles differently.

Every error the server answers in the protocol's shape (``{"error": {"code", "message",
"details"}}``) and every final WebSocket close code maps to one class here, so HTTP and the
two stream transports raise the same thing for the same refusal. Retryable situations
(503, 429, 1001, 1006, 1011, 1013, a dropped connection) are never raised: the client
retries or resumes them itself.
"""

from __future__ import annotations

from typing import Any


class JobfeedError(Exception):
    """Base of everything this package raises on purpose."""


class ServerError(JobfeedError):
    """The server refused a request for a reason retrying would not change.

    ``status`` is the HTTP status (or the WebSocket close code for a stream), ``code`` the
    protocol's error code (``job_not_found``, ``validation_error``, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details or []

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class JobNotFound(ServerError):
    """404 / close 4004: no such job (or, with authentication, not one you may see)."""


class JobExists(ServerError):
    """409 ``job_exists``."""


class JobFinished(ServerError):
    """409 ``job_finished``: the job's log is closed by its terminal event."""


class InvalidRequest(ServerError):
    """400 / 413 / 415 / 422 / close 4400: the request itself is wrong; ``details`` lists
    field errors for a 422."""


class LogReset(ServerError):
    """409 / close 4409 ``log_reset``: the offset and epoch you resume from are not in the
    job's log as it is now (the job was re-created, or the database replaced or restored).
    Drop what you hold of the job and watch again from ``after=0`` without an epoch."""


class Unauthorized(ServerError):
    """401 / close 4401 / SSE ``token_expired``: the credential is missing, invalid or
    expired. With a ``token_provider``, raised only when the provider's fresh token is
    refused too; otherwise the client renews the token and retries or resumes by itself."""


class Forbidden(ServerError):
    """403 / close 4403 / SSE ``forbidden``: the credential may not do this (a scope or job
    grant it lacks), or it was revoked while a stream was open. Never retried."""


class JobDeleted(ServerError):
    """Close 4410 ``job_deleted``: the job was deleted while being watched."""


class StreamClosed(ServerError):
    """A stream closed with a code this client treats as final and knows no better class for
    (e.g. 1009: the client sent a frame over the server's limit)."""


class Unavailable(JobfeedError):
    """The server could not be reached, or kept answering "retry later" (503, 429, 5xx), for
    every attempt a one-shot call was allowed (``Client(attempts=...)``). The reporter and the
    watchers never raise this: they keep retrying. ``retry_after`` is the server's last
    ``Retry-After`` (seconds), if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProtocolViolation(JobfeedError):
    """The server sent something the protocol rules out (a hole in ``seq``, a frame that is
    not JSON). Never retried: resuming could hide lost events."""


class ReporterError(JobfeedError):
    """A reporter cannot deliver what it holds. ``unsent`` counts the events still buffered
    (none of them were dropped)."""

    def __init__(self, message: str, unsent: int) -> None:
        super().__init__(message)
        self.unsent = unsent


class BufferFull(ReporterError):
    """``when_full="raise"``: the reporter's buffer holds ``max_buffered`` events that the
    server has not acknowledged yet; the event you tried to add was not added."""


class FlushTimeout(ReporterError):
    """The reporter could not get its buffered events acknowledged within the time allowed
    (the server is down or refusing); nothing was dropped, ``unsent`` are still buffered."""


_BY_CODE: dict[str, type[ServerError]] = {
    "job_not_found": JobNotFound,
    "job_exists": JobExists,
    "job_finished": JobFinished,
    "log_reset": LogReset,
    "unauthorized": Unauthorized,
    "token_expired": Unauthorized,  # a stream's credential expired while it was open
    "forbidden": Forbidden,
    "job_deleted": JobDeleted,
}
_BY_STATUS: dict[int, type[ServerError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: JobNotFound,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
}
# Final close codes of a job stream (protocol-v1 "Close-code bands").
_BY_CLOSE: dict[int, tuple[type[ServerError], str]] = {
    4004: (JobNotFound, "job_not_found"),
    4400: (InvalidRequest, "invalid_parameter"),
    4401: (Unauthorized, "unauthorized"),
    4403: (Forbidden, "forbidden"),
    4409: (LogReset, "log_reset"),
    4410: (JobDeleted, "job_deleted"),
}


def error_from_body(status: int, body: Any) -> ServerError:
    """The exception for an HTTP error answer (``body`` is its parsed JSON, or anything)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        message = str(error.get("message") or "")
        details = error.get("details")
    else:
        code, message, details = "", f"HTTP {status}", None
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or ServerError
    return cls(
        message or code,
        status=status,
        code=code,
        details=details if isinstance(details, list) else None,
    )


def error_from_close(close_code: int, frame: dict[str, Any] | None) -> ServerError:
    """The exception for a final stream close; ``frame`` is the ``error`` frame sent before
    it, when there was one."""
    cls, default_code = _BY_CLOSE.get(close_code, (StreamClosed, f"close_{close_code}"))
    code = str(frame.get("code") or default_code) if frame else default_code
    message = str(frame.get("message") or "") if frame else ""
    cls = _BY_CODE.get(code, cls)
    return cls(message or f"stream closed with {close_code}", status=close_code, code=code)
