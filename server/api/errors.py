"""Domain errors cross into HTTP here, once: one status and one machine-readable `type` each."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from adapters_store import InvalidTaskId, StoreUnavailable, TaskNotFound, VersionNotFound
from adapters_store.format import FormatError, UploadTooLarge
from server.engine.adapters import AdapterError
from server.engine.request import EngineStopped, InvalidRequest, QueueFull, UnknownTask
from server.engine.residency import ResidencyFull

log = logging.getLogger(__name__)


class PayloadTooLarge(Exception):
    """An upload over the configured size limit."""


# exception type -> (HTTP status, error type)
# exception type -> (HTTP status, error type); the most specific class wins
STATUS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request"),
    InvalidTaskId: (400, "invalid_request"),
    json.JSONDecodeError: (400, "invalid_request"),
    UnknownTask: (404, "unknown_task"),
    TaskNotFound: (404, "unknown_task"),
    VersionNotFound: (404, "unknown_version"),
    PayloadTooLarge: (413, "payload_too_large"),
    UploadTooLarge: (413, "payload_too_large"),
    AdapterError: (422, "invalid_adapter"),
    FormatError: (422, "invalid_adapter"),
    QueueFull: (429, "queue_full"),
    EngineStopped: (503, "unavailable"),
    ResidencyFull: (503, "unavailable"),
    StoreUnavailable: (503, "store_unavailable"),
}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    for exc_type, (status, kind) in STATUS.items():

        async def handler(request: Request, exc: Exception, status: int = status, kind: str = kind) -> JSONResponse:
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            return error_response(status, kind, str(exc), headers)

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_request", _describe(exc.errors()))

    @app.exception_handler(ValidationError)
    async def body_validation(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(400, "invalid_request", _describe(exc.errors()))


def _describe(errors) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)
