"""The HTTP protocol of the SDK without the I/O: `Requests` builds every `httpx.Request` and parses every
`httpx.Response`, `EventDecoder` turns server-sent event lines into `StreamEvent`s. `Client` and `AsyncClient` share
them and differ only in how they send."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypedDict, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from clients.errors import (
    ConnectionLost,
    InvalidRequest,
    ServerError,
    TaskserveError,
    error_from_body,
    error_from_response,
    error_from_transport,
)
from clients.models import Message, Readiness, StreamEvent, Version
from clients.uploads import PreparedUpload, check_task_id

__all__ = ["DEFAULT_URL", "DEFAULT_TIMEOUT", "MessageLike", "Sampling", "Requests", "EventDecoder", "as_messages"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0  # seconds; a long generation on a CPU takes a while
TASK_HEADER = "X-Task-Id"  # lets a proxy route a generation by task without reading its body

try:
    _VERSION = version("taskserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0"

_T = TypeVar("_T", bound=BaseModel)
MessageLike = Message | Mapping[str, str]


class Sampling(TypedDict, total=False):
    """Generation parameters; whatever is left out takes the server's default."""

    max_new_tokens: int  # server default 128
    temperature: float  # 0 = greedy (the default)
    top_p: float
    top_k: int  # 0 = off
    seed: int
    stop: str | Sequence[str]
    ignore_eos: bool
    version: int  # a stored version of the task to run instead of its current one
    adapter_scale: float  # 0-2: weights the task's per-layer delta for this request (0 = the backbone; default 1)


_SAMPLING_KEYS = frozenset(Sampling.__annotations__)


class Requests:
    """Request building and response parsing, shared by both clients: no I/O happens here."""

    def __init__(self, url: str | None, api_key: str | None, timeout: float | httpx.Timeout | None) -> None:
        self.url = (url or os.environ.get("TASKSERVE_URL") or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise InvalidRequest(f"the server URL must start with http:// or https://, not {self.url!r}")
        key = api_key if api_key is not None else os.environ.get("TASKSERVE_API_KEY")
        self.headers = {"User-Agent": f"taskserve-python/{_VERSION}", "Accept": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = httpx.Timeout(timeout)

    def _build(self, method: str, path: str, *, headers: Mapping[str, str] | None = None, **kwargs) -> httpx.Request:
        return httpx.Request(
            method,
            self.url + path,
            headers={**self.headers, **(headers or {})},
            extensions={"timeout": self.timeout.as_dict()},
            **kwargs,
        )

    # --- requests -------------------------------------------------------------------------------------------

    def generate(
        self,
        task: str,
        prompt: str | None,
        messages: Sequence[MessageLike] | None,
        sampling: Mapping[str, Any],
        *,
        stream: bool,
    ) -> httpx.Request:
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of prompt or messages")
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            hint = "; use stream() for server-sent events" if "stream" in unknown else ""
            raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}{hint}")
        body: dict[str, Any] = {key: value for key, value in sampling.items() if value is not None}
        if isinstance(body.get("stop"), str):
            body["stop"] = [body["stop"]]
        elif "stop" in body:
            body["stop"] = list(body["stop"])
        if prompt is not None:
            body["prompt"] = prompt
        else:
            assert messages is not None
            body["messages"] = [_message(m) for m in messages]
        if stream:
            body["stream"] = True
        headers = {TASK_HEADER: task}
        if stream:
            headers["Accept"] = "text/event-stream"
        return self._build("POST", f"/v1/tasks/{_segment(task)}/generate", json=body, headers=headers)

    def upload(self, task: str, upload: PreparedUpload, description: str | None) -> httpx.Request:
        path = f"/v1/tasks/{_segment(check_task_id(task))}/versions"
        description = description if description is not None else upload.description
        if upload.template is not None:
            return self._build("POST", path, json={"template": upload.template, "description": description})
        data = {"description": description} if description is not None else None
        if upload.archive is not None:
            name, content = upload.archive
            return self._build("POST", path, files={"archive": (name, content)}, data=data)
        assert upload.files is not None
        parts = [("files", (name, content, "application/octet-stream")) for name, content in upload.files.items()]
        return self._build("POST", path, files=parts, data=data)

    def list_tasks(self, after: str | None, limit: int) -> httpx.Request:
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._build("GET", "/v1/tasks", params=params)

    def task(self, task: str) -> httpx.Request:
        return self._build("GET", f"/v1/tasks/{_segment(task)}")

    def delete(self, task: str) -> httpx.Request:
        return self._build("DELETE", f"/v1/tasks/{_segment(task)}")

    def rollback(self, task: str, to_version: int) -> httpx.Request:
        return self._build("POST", f"/v1/tasks/{_segment(task)}/rollback", json={"version": to_version})

    def create_key(self, tenant: str, scope: str, quota: Mapping[str, float | None]) -> httpx.Request:
        body = {"tenant": tenant, "scope": scope, **{k: v for k, v in quota.items() if v is not None}}
        return self._build("POST", "/v1/admin/keys", json=body)

    def list_keys(self, tenant: str | None) -> httpx.Request:
        return self._build("GET", "/v1/admin/keys", params={"tenant": tenant} if tenant is not None else None)

    def revoke_key(self, key_id: str) -> httpx.Request:
        return self._build("DELETE", f"/v1/admin/keys/{_segment(key_id)}")

    def health(self) -> httpx.Request:
        return self._build("GET", "/health")

    def ready(self) -> httpx.Request:
        return self._build("GET", "/ready")

    # --- responses ------------------------------------------------------------------------------------------

    @staticmethod
    def check(response: httpx.Response) -> httpx.Response:
        """The response if it is a success; its typed error otherwise. Its body must have been read."""
        if response.is_error:
            raise error_from_response(response)
        return response

    def parse(self, response: httpx.Response, model: type[_T]) -> _T:
        try:
            return model.model_validate(self.check(response).json())
        except (ValueError, ValidationError) as exc:
            raise ServerError(
                f"unexpected answer from {response.request.url}: {exc}", status=response.status_code
            ) from None

    def uploaded(self, response: httpx.Response) -> Version:
        """The version an upload created (201), or the current one it was identical to (200: `unchanged`)."""
        answer = self.parse(response, Version)
        return answer.model_copy(update={"unchanged": True}) if response.status_code == 200 else answer

    @staticmethod
    def readiness(response: httpx.Response) -> Readiness:
        """200 is ready and 503 is not ready yet; anything else is an error."""
        if response.status_code not in (200, 503):
            Requests.check(response)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        return Readiness.model_validate({"status": "unknown", **body, "ready": response.status_code == 200})

    def transport_error(self, exc: httpx.TransportError) -> TaskserveError:
        return error_from_transport(exc, self.url)


class EventDecoder:
    """Server-sent events, one line at a time, into `StreamEvent`s; an `event: error` raises its typed error."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []
        self.finished = False

    def feed(self, line: str) -> StreamEvent | None:
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value
            return None  # comments (":...") and other fields are ignored, as the SSE spec says
        event, data = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        if not data:
            return None
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise ServerError(f"the stream carried an event that is not JSON: {data[:200]!r}") from exc
        if event == "error":
            raise error_from_body(body, status=None)
        parsed = StreamEvent.model_validate(body)
        self.finished = parsed.is_final
        return parsed

    def close(self) -> None:
        if not self.finished:
            raise ConnectionLost("the stream ended before the server said it was finished")


def _segment(task: str) -> str:
    return quote(task, safe="")


def _message(message: MessageLike) -> dict[str, str]:
    if isinstance(message, Message):
        return message.model_dump()
    return {"role": message["role"], "content": message["content"]}


def as_messages(messages: Sequence[MessageLike] | str) -> Sequence[MessageLike]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
