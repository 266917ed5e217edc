"""Domain errors cross into HTTP here, once: one status and one machine-readable `type` each."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.engine.adapters import AdapterError
from server.engine.request import EngineStopped, InvalidRequest, QueueFull, UnknownTask

log = logging.getLogger(__name__)


class PayloadTooLarge(Exception):
    """An upload over the configured size limit."""


# exception type -> (HTTP status, error type)
STATUS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request"),
    UnknownTask: (404, "unknown_task"),
    PayloadTooLarge: (413, "payload_too_large"),
    AdapterError: (422, "invalid_adapter"),
    QueueFull: (429, "queue_full"),
    EngineStopped: (503, "unavailable"),
}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    for exc_type, (status, kind) in STATUS.items():

        async def handler(request: Request, exc: Exception, status: int = status, kind: str = kind) -> JSONResponse:
            headers = {"Retry-After": "1"} if status == 429 else None
            return error_response(status, kind, str(exc), headers)

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(400, "invalid_request", "; ".join(parts))
