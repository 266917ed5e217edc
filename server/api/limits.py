"""Every request body is bounded in size and in time, before and while it is read.

A body declared larger than its route allows is refused (413) from its Content-Length before a byte of it is read;
one that turns out larger while streaming (chunked) is refused as soon as it passes the limit; a body that stalls,
or takes too long as a whole, is answered 408, so slow or half-sent bodies cannot hold connections open. Upload
routes (marked with `uploads`) take `max_upload_bytes` plus room for the multipart framing; every other route takes
`max_request_bytes`. The limit is chosen when the route first reads its body, once routing has picked the route.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

F = TypeVar("F", bound=Callable)

MULTIPART_SLACK = 1 << 20  # boundaries and part headers around the upload's files


class BodyTooLarge(HTTPException):
    """HTTP 413: the body is, or says it is, over its route's limit."""

    def __init__(self, limit: int, declared: int | None = None):
        size = f"of {declared} bytes " if declared is not None else ""
        super().__init__(413, f"the request body {size}exceeds this route's limit of {limit} bytes")


class BodyTimeout(HTTPException):
    """HTTP 408: the body stalled, or took too long as a whole."""

    def __init__(self, reason: str):
        super().__init__(408, f"the request body {reason}; send it whole and promptly")


def uploads(endpoint: F) -> F:
    """Mark an endpoint that takes adapter uploads: its bodies may reach `max_upload_bytes`."""
    endpoint.takes_uploads = True  # type: ignore[attr-defined]
    return endpoint


class BodyLimits:
    """ASGI middleware: wraps `receive` so every read of a request body is bounded."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, max_upload_bytes: int, idle_timeout: float, total_timeout: float
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes + MULTIPART_SLACK
        self.idle_timeout = idle_timeout
        self.total_timeout = total_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        deadline = time.monotonic() + self.total_timeout
        received = 0
        done = False

        async def bounded() -> Message:
            nonlocal received, done
            if done:  # the body is in: later reads only wait for a disconnect, however long a stream runs
                return await receive()
            limit = self._limit(scope)
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit, declared)
            wait = min(self.idle_timeout, deadline - time.monotonic())
            with anyio.move_on_after(max(wait, 0.0)) as timer:
                message = await receive()
            if timer.cancelled_caught:
                stalled = wait >= self.idle_timeout
                raise BodyTimeout(
                    f"sent nothing for {self.idle_timeout:g} s" if stalled else f"took over {self.total_timeout:g} s"
                )
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, bounded, send)

    def _limit(self, scope: Scope) -> int:
        return self.max_upload_bytes if getattr(scope.get("endpoint"), "takes_uploads", False) else self.max_bytes


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    return int(value) if value is not None and value.isdigit() else None
