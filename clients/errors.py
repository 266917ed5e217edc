"""Typed client errors: the server's `{"error": {"type", "message"}}` mapped back to one class per `type`.

Every error the SDK raises is a `TaskserveError`; callers catch the subclass they can act on (`QueueFull` and
`Unavailable` carry the server's `Retry-After`). Errors found before anything is sent (a bad adapter directory, an
invalid task id) use the same classes with `status=None`.
"""

from __future__ import annotations

import httpx

__all__ = [
    "TaskserveError",
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "UnknownTask",
    "UnknownVersion",
    "PayloadTooLarge",
    "InvalidAdapter",
    "QueueFull",
    "Unavailable",
    "StoreUnavailable",
    "ServerError",
    "TransportError",
    "ServerUnreachable",
    "RequestTimeout",
    "ConnectionLost",
    "error_from_body",
    "error_from_response",
    "error_from_transport",
]


class TaskserveError(Exception):
    """Base of every SDK error. `status` is the HTTP status (None when raised before or without a response)."""

    type: str = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if type is not None:
            self.type = type
        self.retry_after = retry_after  # seconds the server asked us to wait (429/503), when it said

    def __str__(self) -> str:
        return self.message


class InvalidRequest(TaskserveError):
    """400: bad parameters (the message names the field)."""

    type = "invalid_request"


class Unauthorized(TaskserveError):
    """401: no API key, or one the server does not know."""

    type = "unauthorized"


class Forbidden(TaskserveError):
    """403: the key lacks the scope (uploads, rollbacks and deletes need an admin key)."""

    type = "forbidden"


class NotFound(TaskserveError):
    """404: something named in the request does not exist."""

    type = "not_found"


class UnknownTask(NotFound):
    type = "unknown_task"


class UnknownVersion(NotFound):
    type = "unknown_version"


class PayloadTooLarge(TaskserveError):
    """413: the upload is over the server's (or this client's) size limit."""

    type = "payload_too_large"


class InvalidAdapter(TaskserveError):
    """422: an adapter or template the server does not serve (the message says why)."""

    type = "invalid_adapter"


class QueueFull(TaskserveError):
    """429: too many waiting requests; retry after `retry_after` seconds."""

    type = "queue_full"


class Unavailable(TaskserveError):
    """503: still loading, or out of device room for a new task right now; retry after `retry_after`."""

    type = "unavailable"


class StoreUnavailable(Unavailable):
    """503: the task store (Redis) cannot be reached; resident tasks keep serving."""

    type = "store_unavailable"


class ServerError(TaskserveError):
    """500 or another unexpected status: the server failed."""

    type = "internal"


class TransportError(TaskserveError):
    """No HTTP answer came back."""

    type = "transport"


class ServerUnreachable(TransportError):
    """Nothing listens at the URL (or the connection could not be made in time)."""

    type = "unreachable"


class RequestTimeout(TransportError):
    """The server took longer than the client's timeout to answer."""

    type = "timeout"


class ConnectionLost(TransportError):
    """The connection broke mid-request or mid-stream."""

    type = "connection_lost"


_BY_TYPE: dict[str, type[TaskserveError]] = {
    cls.type: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        Forbidden,
        UnknownTask,
        UnknownVersion,
        PayloadTooLarge,
        InvalidAdapter,
        QueueFull,
        Unavailable,
        StoreUnavailable,
        ServerError,
    )
}
# for bodies without a known `type` (a proxy's HTML page, a newer server's new type)
_BY_STATUS: dict[int, type[TaskserveError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    422: InvalidAdapter,
    429: QueueFull,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_from_body(body: object, status: int | None, retry_after: float | None = None) -> TaskserveError:
    """The typed error for a decoded error body (also used for a stream's `event: error`)."""
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError) if status is not None else ServerError
    if not isinstance(message, str) or not message:
        message = f"the server answered HTTP {status}" if status is not None else "the server reported an error"
    return cls(message, status=status, type=kind if isinstance(kind, str) else None, retry_after=retry_after)


def error_from_response(response: httpx.Response) -> TaskserveError:
    """The typed error for a non-2xx response whose body has been read."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = error_from_body(body, response.status_code, _retry_after(response))
    if body is None:
        reason = response.reason_phrase or "error"
        error.message = f"the server answered HTTP {response.status_code} {reason} at {response.request.url}"
    return error


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare enough not to parse
        return None


def error_from_transport(exc: httpx.TransportError, url: httpx.URL | str) -> TransportError:
    """A transport failure as a typed error whose message says where it happened."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ServerUnreachable(f"cannot reach the server at {url} ({_reason(exc)}); is `taskserve serve` running?")
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(f"the server at {url} did not answer in time ({type(exc).__name__})")
    return ConnectionLost(f"the connection to {url} failed: {_reason(exc)}")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
