"""Domain errors cross into HTTP here, once: one status and one machine-readable `type` each.

Native routes answer `{"error": {"type", "message"}}`. Routes whose class sets `openai_errors` answer OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the same statuses, so OpenAI clients raise their own typed
exceptions (`NotFoundError`, `BadRequestError`, ...).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from adapters_store import InvalidTaskId, StoreUnavailable, TaskNotFound, VersionNotFound
from adapters_store.format import FormatError, UploadTooLarge
from adapters_store.local import BadPath, PathRefused
from server.api.fields import UNSUPPORTED_PARAMETER
from server.api.quotas import OverQuota
from server.engine.adapters import AdapterError
from server.engine.request import EngineStopped, InvalidRequest, QueueFull, UnknownTask
from server.engine.residency import ResidencyFull
from server.tasks import ModelLoading
from server.tenants import InvalidTenant, UnknownKey

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for a client that left before the answer; only logs and metrics see it


class PayloadTooLarge(Exception):
    """An upload over the configured size limit."""


class Unauthorized(Exception):
    """No API key, or one the server does not know (HTTP 401)."""


class Forbidden(Exception):
    """A valid key without the scope the route needs (HTTP 403)."""


class GenerationFailed(Exception):
    """The engine ended a request with an error instead of a finish reason (HTTP 500)."""


# exception type -> (HTTP status, error type); the most specific class wins
STATUS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request"),
    InvalidTaskId: (400, "invalid_request"),
    BadPath: (400, "invalid_request"),
    json.JSONDecodeError: (400, "invalid_request"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    PathRefused: (403, "forbidden"),
    UnknownTask: (404, "unknown_task"),
    TaskNotFound: (404, "unknown_task"),
    VersionNotFound: (404, "unknown_version"),
    PayloadTooLarge: (413, "payload_too_large"),
    UploadTooLarge: (413, "payload_too_large"),
    AdapterError: (422, "invalid_adapter"),
    FormatError: (422, "invalid_adapter"),
    QueueFull: (429, "queue_full"),
    OverQuota: (429, "rate_limited"),
    UnknownKey: (404, "unknown_key"),
    InvalidTenant: (400, "invalid_request"),
    GenerationFailed: (500, "internal"),
    EngineStopped: (503, "unavailable"),
    ModelLoading: (503, "unavailable"),
    ResidencyFull: (503, "unavailable"),
    StoreUnavailable: (503, "store_unavailable"),
}

# the framework's own errors (routing, body parsing, body limits): HTTP status -> error type
HTTP_KINDS = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

# native error type -> OpenAI `code` where OpenAI has its own name for it
OPENAI_CODES = {"unknown_task": "model_not_found", "unauthorized": "invalid_api_key"}


def error_response(
    request: Request,
    status: int,
    kind: str,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry_after: int = 1,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    # a message may quote user input (an archive member's name, ...): never let it make the error unsendable
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if getattr(request.scope.get("route"), "openai_errors", False):
        if kind == "unknown_task":
            param = "model"
        param = _openai_param(request, param)
        error = {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": code or OPENAI_CODES.get(kind, kind),
        }
    else:
        error = {"type": kind, "message": message}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


# the engine's and the native API's field names -> the OpenAI routes' own
OPENAI_PARAMS = {"max_new_tokens": "max_tokens"}


def _openai_param(request: Request, param: str | None) -> str | None:
    """A field at fault as an OpenAI client named it: a chat request has `messages` where the engine says `prompt`."""
    if param == "prompt" and request.url.path.endswith("/chat/completions"):
        return "messages"
    return OPENAI_PARAMS.get(param, param)


def install(app: FastAPI, on_error: Callable[[str], None] | None = None) -> None:
    """Map every domain error; `on_error(type)` sees each one (metrics)."""

    def answer(
        request: Request, status: int, kind: str, message: str, param: str | None = None, code: str | None = None, **kw
    ) -> JSONResponse:
        if on_error is not None:
            on_error(kind)
        return error_response(request, status, kind, message, param=param, code=code, **kw)

    for exc_type, (status, kind) in STATUS.items():

        async def handler(request: Request, exc: Exception, status: int = status, kind: str = kind) -> JSONResponse:
            retry_after = getattr(exc, "retry_after", 1)
            param, code = getattr(exc, "param", None), getattr(exc, "code", None)
            response = answer(request, status, kind, str(exc), param=param, code=code, retry_after=retry_after)
            response.headers.update(getattr(exc, "headers", None) or {})  # x-ratelimit-* on a quota's 429
            return response

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Routing (404, 405), body parsing and body limits: the same shape as every other error."""
        status = exc.status_code
        kind = HTTP_KINDS.get(status, "invalid_request" if status < 500 else "internal")
        response = answer(request, status, kind, _framework_message(request, exc))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug: the documented 500 (Starlette logs the traceback after this answer)."""
        return answer(request, 500, "internal", "internal error; the server log has the details")

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, 400, "invalid_request", *_describe(exc.errors()))

    @app.exception_handler(ValidationError)
    async def body_validation(request: Request, exc: ValidationError) -> JSONResponse:
        return answer(request, 400, "invalid_request", *_describe(exc.errors()))

    _document_400_not_422(app)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the status reaches the request metrics


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a `422 HTTPValidationError` on every route with parameters; here a request that fails
    validation gets a 400 in the documented shape, which each route declares, so the spec says only that."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        for operation in (op for path in spec.get("paths", {}).values() for op in path.values()):
            schema = operation.get("responses", {}).get("422", {}).get("content", {}).get("application/json", {})
            if schema.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del operation["responses"]["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            spec.get("components", {}).get("schemas", {}).pop(name, None)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _framework_message(request: Request, exc: HTTPException) -> str:
    method, path = request.method, request.url.path
    if exc.status_code == 404 and request.scope.get("route") is None:
        return f"no route {method} {path}; the routes are listed at /docs"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"{method} is not allowed on {path}" + (f"; allowed: {allowed}" if allowed else "")
    cause = exc.__cause__
    if exc.status_code == 400 and cause is not None:  # FastAPI: "There was an error parsing the body"
        return f"the body cannot be parsed: {type(cause).__name__}: {cause}"
    return str(exc.detail)


# pydantic error type -> OpenAI `code`: a field the schema does not declare, or one declared only to refuse it
VALIDATION_CODES = {"extra_forbidden": "unknown_parameter", UNSUPPORTED_PARAMETER: "unsupported_parameter"}


def _describe(errors) -> tuple[str, str | None, str | None]:
    """(one message for every error, the first error's field: OpenAI's `param`, the first error's OpenAI code)."""
    parts, params, codes = [], [], []
    for err in errors:
        if err.get("type") == "json_invalid":  # FastAPI puts the character offset where a field name goes
            offset = err.get("loc", (None, "?"))[-1]
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error')} at character {offset}")
            params.append(None)
            codes.append(None)
            continue
        # pydantic names the member of a union it tried (`function-after[...]`, `list[str]`): not a field
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and "[" not in str(p))
        message = str(err.get("msg")).removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        if err.get("type") == "extra_forbidden":
            message = "unknown parameter: this server refuses what it does not honour (docs/api.md lists every field)"
        parts.append(f"{where}: {message}" if where else message)
        params.append(where or None)
        codes.append(VALIDATION_CODES.get(err.get("type")))
    return "; ".join(parts), params[0] if params else None, codes[0] if codes else None
