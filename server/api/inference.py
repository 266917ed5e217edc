"""What the native and the OpenAI-compatible routes share: tokenising, sampling, leasing, streaming, metrics."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import TypeVar

import anyio
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from adapters_store import TaskNotFound
from server.api.admission import Admission, Ticket
from server.api.errors import GenerationFailed
from server.api.metrics import Metrics
from server.api.quotas import Spend
from server.engine.adapters import LoadedAdapter
from server.engine.adapters.template import render_ids
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, InvalidRequest, TokenDelta
from server.engine.sampling import SamplingParams
from server.tenants import Caller

T = TypeVar("T")


def sampling_params(**fields) -> SamplingParams:
    """`SamplingParams(**fields)`, its refusals as a 400."""
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


async def start_generation(
    engine: Engine,
    task_id: str,
    sampling: SamplingParams,
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    fill_context: bool = False,
    metrics: Metrics | None = None,
    admission: Admission | None = None,
    caller: Caller | None = None,
) -> AsyncIterator[TokenDelta]:
    """Admit, lease the task, tokenise, submit; overload, bad input and a full queue raise here, before any byte
    is sent. Tokenising runs on a worker thread: a long prompt never holds up the event loop.

    `fill_context`: generate up to what the context and the server's limits leave (`sampling.max_new_tokens`
    is then only an upper bound). The returned iterator must be closed (`aclose`) by whoever stops reading it.
    """
    started = time.perf_counter()
    if caller is not None and not caller.sees(task_id):
        raise TaskNotFound(f"unknown task {task_id!r}")  # a task of another tenant does not exist for this one
    spend = admission.quotas.admit(caller) if admission is not None and caller is not None else None
    try:
        ticket = admission.admit(engine, sampling.max_new_tokens) if admission is not None else None
    except BaseException:
        if spend is not None:
            spend.release()
        raise
    try:
        lease = await engine.lease(task_id)  # resolves and loads the task off the event loop if needed
        if metrics is not None and lease.adapter is not None:
            metrics.last_use.touch(task_id)
        try:
            prompt_ids = await run_in_threadpool(encode, engine, lease.adapter, prompt=prompt, messages=messages)
            if fill_context:
                room = room_for(engine, lease.adapter, prompt_ids)
                sampling = replace(sampling, max_new_tokens=max(1, min(room, sampling.max_new_tokens)))
            deltas = engine.generate(GenerationRequest(prompt_ids, sampling, task_id=task_id), lease)
        except BaseException:
            lease.release()
            raise
    except BaseException:
        for hold in (ticket, spend):
            if hold is not None:
                hold.release()
        raise
    if metrics is None and ticket is None and spend is None:
        return deltas
    observed = _observed(deltas, started, metrics, admission, ticket, spend)
    for hold in (ticket, spend):
        if hold is not None:  # a stream dropped before its first read never runs its finally
            weakref.finalize(observed, hold.release)
    return observed


def encode(
    engine: Engine,
    adapter: LoadedAdapter | None,
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
) -> tuple[int, ...]:
    """A request's token ids: the prompt, the chat-templated messages, or what a template task wraps."""
    tokenizer = engine.backbone.tokenizer
    if tokenizer is None:
        raise InvalidRequest("this backbone has no tokenizer, so it takes no text")
    if adapter is not None and adapter.template is not None:
        return render_ids(adapter, prompt if prompt is not None else _sole_user_input(messages), tokenizer)
    if messages is not None:
        try:
            ids = tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except ValueError as exc:  # e.g. the tokenizer has no chat template
            raise InvalidRequest(f"cannot apply the chat template: {exc}") from None
    else:
        ids = tokenizer.encode(prompt or "")
    if not ids:
        raise InvalidRequest("the prompt is empty")
    limit = engine.backbone.geometry.context_length
    if len(ids) >= limit:  # refused here, on this thread, rather than checked token by token on the event loop
        raise InvalidRequest(f"the prompt is {len(ids)} tokens; the context length is {limit}")
    return tuple(ids)


def _sole_user_input(messages: Sequence[Mapping[str, str]] | None) -> str:
    if messages is not None and len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    raise InvalidRequest(
        "this task wraps one input in its template: send 'prompt', or a single user message, not a conversation"
    )


def room_for(engine: Engine, adapter: LoadedAdapter | None, prompt_ids: tuple[int, ...]) -> int:
    """New tokens this prompt may still ask for: the context, the KV pool and the server's cap all bound it."""
    virtual = 0 if adapter is None else adapter.prefix_len + adapter.soft_len
    limit = min(engine.backbone.geometry.context_length, engine.settings.max_kv_tokens)
    return min(engine.settings.max_new_tokens, limit - virtual - len(prompt_ids))


async def _observed(
    deltas: AsyncIterator[TokenDelta],
    started: float,
    metrics: Metrics | None,
    admission: Admission | None,
    ticket: Ticket | None,
    spend: Spend | None = None,
) -> AsyncIterator[TokenDelta]:
    """Pass the deltas through, timing them for the metrics and the admission's estimate; closing this closes the
    engine's stream (which cancels the row), gives the request's place back and charges its tokens to its quotas."""
    last: float | None = None
    used = 0  # prompt and completion tokens, as the last delta counts them
    finish = "cancelled"  # unless a last delta says otherwise: the reader left first
    try:
        async for delta in deltas:
            if delta.token_ids:
                now = time.perf_counter()
                if last is None:
                    if metrics is not None:
                        metrics.time_to_first_token.observe(now - started)
                        metrics.prompt_tokens.inc(delta.prompt_tokens)
                else:
                    gap = (now - last) / len(delta.token_ids)
                    if metrics is not None:
                        for _ in delta.token_ids:
                            metrics.inter_token_latency.observe(gap)
                    if admission is not None:
                        admission.step(gap)
                last = now
                if metrics is not None:
                    metrics.completion_tokens.inc(len(delta.token_ids))
            if delta.finish_reason is not None:
                finish = delta.finish_reason
                used = delta.prompt_tokens + delta.completion_tokens
                if admission is not None and finish in ("stop", "length"):
                    admission.finished(delta.completion_tokens)
            yield delta
    finally:
        if ticket is not None:
            ticket.release()
        if spend is not None:
            spend.release(used)
        if metrics is not None:
            metrics.generations.labels(finish_reason=finish).inc()
        await deltas.aclose()


@dataclass(frozen=True)
class Completed:
    """A whole generation, collected."""

    text: str
    token_ids: list[int]
    last: TokenDelta  # carries finish_reason, usage and the task version

    @property
    def version(self) -> int | None:
        return task_version(self.last)


async def collect(deltas: AsyncIterator[TokenDelta]) -> Completed:
    text, token_ids, delta = [], [], None
    async with aclosing(deltas):
        async for delta in deltas:
            if delta.finish_reason not in (None, "stop", "length"):
                raise GenerationFailed(f"generation failed: {delta.error or delta.finish_reason}")
            text.append(delta.text)
            token_ids += delta.token_ids
    if delta is None:
        raise GenerationFailed("generation ended without a finish reason")
    return Completed(text="".join(text), token_ids=token_ids, last=delta)


def task_version(delta: TokenDelta) -> int | None:
    return None if delta.task_version is None else delta.task_version.version


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first: a non-streamed generation frees its row too.

    Raises `ClientDisconnect` then (answered with 499, which only the logs and metrics see). Errors of `work`
    are raised as they are, not wrapped in the task group's ExceptionGroup, so the error handlers see them.
    """
    done: list[T] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            done.append(await work)
        except Exception as exc:
            failed.append(exc)
        group.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not done:
        raise ClientDisconnect()
    return done[0]


# one server-sent event, as OpenAPI documents a `text/event-stream` response (for Swagger UI and Schemathesis)
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string", "enum": ["message", "error"], "description": "error: the generation failed"},
        "data": {"type": "string", "description": "one JSON object (OpenAI routes end with `[DONE]`)"},
    },
}


class EventStream(StreamingResponse):
    """Server-sent events that always close their source when the response ends, however it ends.

    Starlette stops iterating when the client disconnects, but an iterator suspended at a `yield` is only
    closed when it is garbage-collected; closing it here cancels the engine row at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], *, source: AsyncIterator[TokenDelta]):
        # no-cache and X-Accel-Buffering: proxies (nginx) must pass each event on as it comes
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.source.aclose()  # type: ignore[attr-defined]
