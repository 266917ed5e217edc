"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) for taskserve's native HTTP API.

Both share `clients._protocol.Requests`, which builds every `httpx.Request` and parses every `httpx.Response`; the
two clients only send them. Errors come back as typed exceptions under `TaskserveError` (`clients.errors`).

    from clients import Client

    with Client() as client:                      # TASKSERVE_URL / TASKSERVE_API_KEY, or url=..., api_key=...
        client.upload("e2e", "out/e2e")           # a save_pretrained directory, an archive, or a PeftModel
        print(client.generate("e2e", "name[The Eagle] food[Chinese]", max_new_tokens=40).text)
        for event in client.stream("base", "Once upon a time"):
            print(event.text, end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Unpack

import httpx

from clients._protocol import DEFAULT_TIMEOUT, DEFAULT_URL, EventDecoder, MessageLike, Requests, Sampling, as_messages
from clients.models import ApiKey, Generation, NewApiKey, Readiness, StreamEvent, Task, TaskPage, Version
from clients.uploads import DEFAULT_MAX_UPLOAD_BYTES, UploadSource, check_task_id, prepare_template, prepare_upload

__all__ = ["DEFAULT_URL", "Client", "AsyncClient", "Sampling"]


class Client:
    """A blocking client. URL and key come from the arguments, else `TASKSERVE_URL` / `TASKSERVE_API_KEY`."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        self._requests = Requests(url, api_key, timeout)
        self._http = httpx.Client(transport=transport)
        self._max_upload_bytes = max_upload_bytes

    @property
    def url(self) -> str:
        return self._requests.url

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            response = self._http.send(request, stream=stream)
            if stream and response.is_error:
                response.read()
                response.close()
        except httpx.TransportError as exc:
            raise self._requests.transport_error(exc) from exc
        return self._requests.check(response)

    def generate(
        self,
        task: str,
        prompt: str | None = None,
        messages: Sequence[MessageLike] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Generation:
        """Generate with `task` (`base` is the backbone alone) from a `prompt` or chat `messages`."""
        request = self._requests.generate(task, prompt, messages, sampling, stream=False)
        return self._requests.parse(self._send(request), Generation)

    def chat(self, task: str, messages: Sequence[MessageLike] | str, **sampling: Unpack[Sampling]) -> Generation:
        """`generate` from chat messages (a string is one user message); the server applies the chat template."""
        return self.generate(task, messages=as_messages(messages), **sampling)

    def stream(
        self,
        task: str,
        prompt: str | None = None,
        messages: Sequence[MessageLike] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Iterator[StreamEvent]:
        """Generate as a stream of events; the request is sent when iteration starts. Stop iterating (or close
        the iterator) to cancel the generation on the server."""
        request = self._requests.generate(task, prompt, messages, sampling, stream=True)
        response = self._send(request, stream=True)
        decoder = EventDecoder()
        try:
            for line in response.iter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event
            decoder.close()
        except httpx.TransportError as exc:
            raise self._requests.transport_error(exc) from exc
        finally:
            response.close()

    def upload(self, task: str, source: UploadSource, *, description: str | None = None) -> Version:
        """Upload a new version of `task` from a save_pretrained directory, a .tar.gz/.zip of one, an in-memory
        `PeftModel`, or a template .json. It is checked locally first: a bad adapter raises and nothing is sent."""
        check_task_id(task)
        upload = prepare_upload(source, max_bytes=self._max_upload_bytes)
        return self._requests.uploaded(self._send(self._requests.upload(task, upload, description)))

    def upload_template(self, task: str, template: Mapping[str, Any], *, description: str | None = None) -> Version:
        """Upload a template task (system, instruction, few-shot examples, input prefix/suffix, chat)."""
        check_task_id(task)
        upload = prepare_template(template, description)
        return self._requests.uploaded(self._send(self._requests.upload(task, upload, description)))

    def tasks(self, *, page_size: int = 100) -> Iterator[Version]:
        """Every task's current version, in id order, fetching pages as it goes."""
        after: str | None = None
        while True:
            page = self._requests.parse(self._send(self._requests.list_tasks(after, page_size)), TaskPage)
            yield from page.tasks
            if page.next_after is None:
                return
            after = page.next_after

    def task(self, task: str) -> Task:
        """One task: its current version, every version, and whether it is on the device."""
        return self._requests.parse(self._send(self._requests.task(task)), Task)

    def delete(self, task: str) -> None:
        """Delete a task and all its versions."""
        self._send(self._requests.delete(task))

    def rollback(self, task: str, version: int) -> Version:
        """Make `version` of `task` current again."""
        return self._requests.parse(self._send(self._requests.rollback(task, version)), Version)

    def create_key(self, tenant: str, *, scope: str = "inference", **quota: float | None) -> NewApiKey:
        """A new API key for `tenant` (a bootstrap admin key is needed); the key itself is only in this answer."""
        return self._requests.parse(self._send(self._requests.create_key(tenant, scope, quota)), NewApiKey)

    def keys(self, tenant: str | None = None) -> list[ApiKey]:
        """The tenants' keys (ids and quotas, never the keys)."""
        response = self._requests.check(self._send(self._requests.list_keys(tenant)))
        return [ApiKey.model_validate(k) for k in response.json()["keys"]]

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key by its id; every replica refuses it within a second."""
        self._send(self._requests.revoke_key(key_id))

    def health(self) -> bool:
        """True when the server process answers (raises `ServerUnreachable` when nothing does)."""
        self._send(self._requests.health())
        return True

    def ready(self) -> Readiness:
        """Whether the server can serve: model loaded, engine running, store reachable."""
        try:
            response = self._http.send(self._requests.ready())
        except httpx.TransportError as exc:
            raise self._requests.transport_error(exc) from exc
        return self._requests.readiness(response)


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited (`stream` and `tasks` are async iterators)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        self._requests = Requests(url, api_key, timeout)
        self._http = httpx.AsyncClient(transport=transport)
        self._max_upload_bytes = max_upload_bytes

    @property
    def url(self) -> str:
        return self._requests.url

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            response = await self._http.send(request, stream=stream)
            if stream and response.is_error:
                await response.aread()
                await response.aclose()
        except httpx.TransportError as exc:
            raise self._requests.transport_error(exc) from exc
        return self._requests.check(response)

    async def generate(
        self,
        task: str,
        prompt: str | None = None,
        messages: Sequence[MessageLike] | None = None,
        **sampling: Unpack[Sampling],
    ) -> Generation:
        request = self._requests.generate(task, prompt, messages, sampling, stream=False)
        return self._requests.parse(await self._send(request), Generation)

    async def chat(self, task: str, messages: Sequence[MessageLike] | str, **sampling: Unpack[Sampling]) -> Generation:
        return await self.generate(task, messages=as_messages(messages), **sampling)

    async def stream(
        self,
        task: str,
        prompt: str | None = None,
        messages: Sequence[MessageLike] | None = None,
        **sampling: Unpack[Sampling],
    ) -> AsyncIterator[StreamEvent]:
        request = self._requests.generate(task, prompt, messages, sampling, stream=True)
        response = await self._send(request, stream=True)
        decoder = EventDecoder()
        try:
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event
            decoder.close()
        except httpx.TransportError as exc:
            raise self._requests.transport_error(exc) from exc
        finally:
            await response.aclose()

    async def upload(self, task: str, source: UploadSource, *, description: str | None = None) -> Version:
        check_task_id(task)
        # reading files (or saving a PeftModel) blocks: keep it off the event loop
        upload = await asyncio.to_thread(prepare_upload, source, max_bytes=self._max_upload_bytes)
        return self._requests.uploaded(await self._send(self._requests.upload(task, upload, description)))

    async def upload_template(
        self, task: str, template: Mapping[str, Any], *, description: str | None = None
    ) -> Version:
        check_task_id(task)
        upload = prepare_template(template, description)
        return self._requests.uploaded(await self._send(self._requests.upload(task, upload, description)))

    async def tasks(self, *, page_size: int = 100) -> AsyncIterator[Version]:
        after: str | None = None
        while True:
            page = self._requests.parse(await self._send(self._requests.list_tasks(after, page_size)), TaskPage)
            for version_info in page.tasks:
                yield version_info
            if page.next_after is None:
                return
            after = page.next_after

    async def task(self, task: str) -> Task:
        return self._requests.parse(await self._send(self._requests.task(task)), Task)

    async def delete(self, task: str) -> None:
        await self._send(self._requests.delete(task))

    async def rollback(self, task: str, version: int) -> Version:
        return self._requests.parse(await self._send(self._requests.rollback(task, version)), Version)

    async def create_key(self, tenant: str, *, scope: str = "inference", **quota: float | None) -> NewApiKey:
        return self._requests.parse(await self._send(self._requests.create_key(tenant, scope, quota)), NewApiKey)

    async def keys(self, tenant: str | None = None) -> list[ApiKey]:
        response = self._requests.check(await self._send(self._requests.list_keys(tenant)))
        return [ApiKey.model_validate(k) for k in response.json()["keys"]]

    async def revoke_key(self, key_id: str) -> None:
        await self._send(self._requests.revoke_key(key_id))

    async def health(self) -> bool:
        await self._send(self._requests.health())
        return True

    async def ready(self) -> Readiness:
        try:
            response = await self._http.send(self._requests.ready())
        except httpx.TransportError as exc:
            raise self._requests.transport_error(exc) from exc
        return self._requests.readiness(response)
