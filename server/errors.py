"""The service's errors: each class carries its HTTP status and code; one body shape for all.

Domain code raises a ``ServiceError`` subclass; the error middleware (``server.app``) turns it
into the spec's body ``{"error": {"code", "message", "details"}}``. WebSocket close codes live
here too, so the two transports agree on what each failure means.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    headers: dict[str, str]

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers = {}

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    """The HTTP error body, ending with a newline like every JSON body the server sends."""
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)


class InvalidJson(ServiceError):
    status = 400
    code = "invalid_json"


class InvalidParameter(ServiceError):
    status = 400
    code = "invalid_parameter"


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    """No usable credential. ``reason`` says which of missing / malformed / bad signature /
    expired / not yet valid / wrong audience / wrong issuer / revoked; the message starts
    with it and never contains the credential."""

    status = 401
    code = "unauthorized"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        # RFC 6750, section 3: the scheme, and for a credential that was sent, why it failed.
        challenge = 'Bearer realm="jobfeed"'
        if reason != "missing":
            challenge += f', error="invalid_token", error_description="{reason}"'
        self.headers = {"WWW-Authenticate": challenge}


class TokenExpired(Unauthorized):
    """A stream's credential expired while it was open (WebSocket 4401, SSE error event)."""

    code = "token_expired"

    def __init__(self) -> None:
        super().__init__(
            "expired",
            "the credential of this stream expired; get a new one and resume from your last seq",
        )


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class OriginNotAllowed(Forbidden):
    def __init__(self, origin: str) -> None:
        super().__init__(
            f"origin {origin[:100]} is not allowed to open a WebSocket (http.cors_origins)"
        )


class JobNotFound(ServiceError):
    status = 404
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} does not exist")


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


class JobExists(ServiceError):
    status = 409
    code = "job_exists"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} already exists")


class JobFinished(ServiceError):
    status = 409
    code = "job_finished"

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} is {status}; its log is closed")


class JobDeleted(ServiceError):
    """The job a stream follows was deleted (``DELETE /v1/jobs/{id}`` or retention) while the
    stream was open: WebSocket 4410, SSE ``event: error``; final (the log is gone)."""

    status = 410
    code = "job_deleted"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was deleted; its log is gone")


class LogReset(ServiceError):
    """The subscriber's ``epoch``/``after`` do not belong to this job's log as it is now: the
    job was re-created, the database replaced, or the log restored to before ``after``."""

    status = 409
    code = "log_reset"


class BodyTimeout(ServiceError):
    status = 408
    code = "body_timeout"


class BodyTooLarge(ServiceError):
    status = 413
    code = "body_too_large"


class EventTooLarge(ServiceError):
    status = 413
    code = "event_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class ValidationFailed(ServiceError):
    status = 422
    code = "validation_error"


class RateLimited(ServiceError):
    """One client address sent more than ``limits.rate_per_client`` requests per second."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class Overloaded(ServiceError):
    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class StorageUnavailable(ServiceError):
    status = 503
    code = "storage_unavailable"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class CommitOutcomeUnknown(StorageUnavailable):
    """The COMMIT itself failed (e.g. the WAL's fsync): the events may or may not be in the
    log. Same code as any storage fault; ``details`` says that the outcome is unknown."""

    def __init__(self, error: str, retry_after: int = 1) -> None:
        super().__init__(
            f"the commit failed ({error}): these events may or may not be in the log; "
            "retrying with the same idempotency keys is safe (an event already stored is "
            "answered as a duplicate); without keys a retry may store them twice",
            retry_after,
        )
        self.details = [
            {
                "type": "outcome_unknown",
                "msg": "the commit's outcome is unknown; retry with the same keys",
            }
        ]


class ShuttingDown(ServiceError):
    status = 503
    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry against the new process")
        self.headers = {"Retry-After": "1"}


class WSClose:
    """WebSocket close codes (protocol v1). 1xxx: resume later or done; 4xxx: final."""

    DONE = 1000
    GOING_AWAY = 1001
    TOO_BIG = 1009
    INTERNAL = 1011
    OVERLOADED = 1013
    JOB_NOT_FOUND = 4004
    BAD_REQUEST = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    LOG_RESET = 4409
    JOB_DELETED = 4410
