"""What the native and the OpenAI-compatible routes share: tokenising, sampling, leasing, streaming, metrics."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from adapters_store import TaskNotFound
from server.api.admission import Admission, Ticket
from server.api.errors import GenerationFailed
from server.api.metrics import Meter, Metrics, tenant_label
from server.api.quotas import OverQuota, Spend
from server.engine.adapters import LoadedAdapter
from server.engine.adapters.template import render_ids
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, InvalidRequest, TokenDelta, TokenLogprob
from server.engine.sampling import SamplingParams
from server.tenants import Caller

T = TypeVar("T")


def sampling_params(**fields) -> SamplingParams:
    """`SamplingParams(**fields)`, its refusals as a 400."""
    try:
        return SamplingParams(**fields)
    except ValueError as exc:  # its messages start with the field's name
        name = str(exc).split(" ", 1)[0]
        raise InvalidRequest(str(exc), param=name if name in SamplingParams.__dataclass_fields__ else None) from None


async def start_generation(
    engine: Engine, task_id: str, sampling: SamplingParams, **inputs
) -> AsyncIterator[TokenDelta]:
    """`start_choices` for one choice: its stream."""
    return (await start_choices(engine, task_id, sampling, **inputs))[0]


async def start_choices(
    engine: Engine,
    task_id: str,
    sampling: SamplingParams,
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt_ids: Sequence[int] | None = None,
    tools: list[dict] | None = None,
    fill_context: bool = False,
    version: int | None = None,
    metrics: Metrics | None = None,
    admission: Admission | None = None,
    caller: Caller | None = None,
    adapter_scale: float = 1.0,
) -> list[AsyncIterator[TokenDelta]]:
    """Admit, lease the task, tokenise, submit; overload, bad input and a full queue raise here, before any byte
    is sent. Tokenising runs on a worker thread: a long prompt never holds up the event loop. Returns one stream
    per choice (`sampling.n`), each admitted as a row of its own.

    `version`: a stored version of the task to run instead of its current one.
    `fill_context`: generate up to what the context and the server's limits leave (`sampling.max_new_tokens`
    is then only an upper bound). Each returned iterator must be closed (`aclose`) by whoever stops reading it.
    """
    started = time.perf_counter()
    if caller is not None and not caller.sees(task_id):
        raise TaskNotFound(f"unknown task {task_id!r}")  # a task of another tenant does not exist for this one
    if sampling.constraint is not None:  # checked and compiled off the event loop (then cached for the rows)
        await run_in_threadpool(engine.grammars.compile, sampling.constraint)
    try:
        spend = await _admit_quotas(admission, caller)
    except OverQuota:
        if metrics is not None:
            metrics.rate_limited.labels(tenant_label(caller)).inc()
        raise
    tickets: list[Ticket] = []
    meter: Meter | None = None
    try:
        if admission is not None:
            for _ in range(sampling.n):
                tickets.append(admission.admit(engine, sampling.max_new_tokens))
        lease = await engine.lease(task_id, version)  # resolves and loads the task off the event loop if needed
        if metrics is not None:
            meter = metrics.meter(task_id, caller)
            meter.admitted()
            if lease.adapter is not None:
                metrics.last_use.touch(task_id)
        try:
            ids = await run_in_threadpool(
                encode, engine, lease.adapter, prompt=prompt, messages=messages, prompt_ids=prompt_ids, tools=tools
            )
            if fill_context:
                room = room_for(engine, lease.adapter, ids)
                sampling = sampling_params(
                    **{**asdict(sampling), "max_new_tokens": max(1, min(room, sampling.max_new_tokens))}
                )
            request = GenerationRequest(ids, sampling, task_id=task_id, version=version, adapter_scale=adapter_scale)
            streams = engine.generate_choices(request, lease)
        except BaseException:
            lease.release()
            raise
    except BaseException:
        for hold in [*tickets, spend]:
            if hold is not None:
                hold.release()
        raise
    if meter is None and admission is None:
        return streams
    observed = []
    for i, stream in enumerate(streams):
        ticket = tickets[i] if tickets else None
        charged = spend if i == 0 else None  # the request's quota hold rides on its first choice
        watched = _observed(stream, started, meter, admission, ticket, charged, prefilled=i == 0)
        for hold in (ticket, charged):
            if hold is not None:  # a stream dropped before its first read never runs its finally
                weakref.finalize(watched, hold.release)
        observed.append(watched)
    return observed


async def _admit_quotas(admission: Admission | None, caller: Caller | None) -> Spend | None:
    """The caller's hold on its quotas; counted in Redis (off the event loop) when the store is shared."""
    if admission is None or caller is None or caller.key is None:
        return None
    quotas = admission.quotas
    return await run_in_threadpool(quotas.admit, caller) if quotas.buckets.shared else quotas.admit(caller)


def encode(
    engine: Engine,
    adapter: LoadedAdapter | None,
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt_ids: Sequence[int] | None = None,
    tools: list[dict] | None = None,
) -> tuple[int, ...]:
    """A request's token ids: the prompt, the chat-templated messages, what a template task wraps, or the token ids
    given as they are. `tools` go to the chat template (a template that does not render them ignores them)."""
    tokenizer = engine.backbone.tokenizer
    if prompt_ids is not None:
        if adapter is not None and adapter.template is not None:
            message = "this task wraps text in its template: send the prompt as text, not token ids"
            raise InvalidRequest(message, param="prompt")
        ids = list(prompt_ids)
    elif tokenizer is None:
        raise InvalidRequest("this backbone has no tokenizer, so it takes no text", param="prompt")
    elif adapter is not None and adapter.template is not None:
        return render_ids(adapter, prompt if prompt is not None else _sole_user_input(messages), tokenizer)
    elif messages is not None:
        try:
            ids = tokenizer.apply_chat_template(
                [dict(m) for m in messages], tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except ValueError as exc:  # e.g. the tokenizer has no chat template
            raise InvalidRequest(f"cannot apply the chat template: {exc}", param="messages") from None
    else:
        ids = tokenizer.encode(prompt or "")
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    limit = engine.backbone.geometry.context_length
    if len(ids) >= limit:  # refused here, on this thread, rather than checked token by token on the event loop
        raise InvalidRequest(
            f"the prompt is {len(ids)} tokens; the context length is {limit}", "prompt", "context_length_exceeded"
        )
    return tuple(ids)


def _sole_user_input(messages: Sequence[Mapping[str, Any]] | None) -> str:
    if messages is not None and len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    raise InvalidRequest(
        "this task wraps one input in its template: send 'prompt', or a single user message, not a conversation",
        param="messages",
    )


def room_for(engine: Engine, adapter: LoadedAdapter | None, prompt_ids: tuple[int, ...]) -> int:
    """New tokens this prompt may still ask for: the context, the KV pool and the server's cap all bound it."""
    virtual = 0 if adapter is None else adapter.prefix_len + adapter.soft_len
    limit = min(engine.backbone.geometry.context_length, engine.settings.max_kv_tokens)
    return min(engine.settings.max_new_tokens, limit - virtual - len(prompt_ids))


async def _observed(
    deltas: AsyncIterator[TokenDelta],
    started: float,
    meter: Meter | None,
    admission: Admission | None,
    ticket: Ticket | None,
    spend: Spend | None = None,
    prefilled: bool = True,
) -> AsyncIterator[TokenDelta]:
    """Pass the deltas through, timing them for the metrics and the admission's estimate; closing this closes the
    engine's stream (which cancels the row), gives the request's place back and charges its tokens to its quotas.
    `prefilled`: this stream's row computed the prompt (the other choices of a request share it, so its tokens
    count once)."""
    last: float | None = None
    used = 0  # prompt and completion tokens, as the last delta counts them
    finish = "cancelled"  # unless a last delta says otherwise: the reader left first
    try:
        async for delta in deltas:
            if delta.token_ids:
                now = time.perf_counter()
                gap = None if last is None else (now - last) / len(delta.token_ids)
                if meter is not None:
                    if last is None:
                        meter.first_token(now - started, delta, prefilled)
                    meter.tokens(len(delta.token_ids), gap)
                if gap is not None and admission is not None:
                    admission.step(gap)
                last = now
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
        if meter is not None:
            meter.finished(finish)
        await deltas.aclose()


@dataclass(frozen=True)
class Completed:
    """A whole generation, collected."""

    text: str
    token_ids: list[int]
    last: TokenDelta  # carries finish_reason, usage and the task version
    first: TokenDelta  # carries the prompt's ids and, when asked, its log-probabilities
    logprobs: list[TokenLogprob]  # one per token id when the request asked for them, else empty

    @property
    def version(self) -> int | None:
        return task_version(self.last)


async def collect(deltas: AsyncIterator[TokenDelta]) -> Completed:
    text, token_ids, logprobs, first, delta = [], [], [], None, None
    async with aclosing(deltas):
        async for delta in deltas:
            if delta.finish_reason not in (None, "stop", "length"):
                raise GenerationFailed(f"generation failed: {delta.error or delta.finish_reason}")
            first = first or delta
            text.append(delta.text)
            token_ids += delta.token_ids
            logprobs += delta.logprobs or ()
    if delta is None:
        raise GenerationFailed("generation ended without a finish reason")
    return Completed(text="".join(text), token_ids=token_ids, last=delta, first=first, logprobs=logprobs)


async def collect_all(streams: Sequence[AsyncIterator[TokenDelta]]) -> list[Completed]:
    """`collect` each stream at once; the first failure cancels the rest (and is raised as it is)."""
    done: list[Completed | None] = [None] * len(streams)

    async def one(i: int) -> None:
        done[i] = await collect(streams[i])

    try:
        async with anyio.create_task_group() as group:
            for i in range(len(streams)):
                group.start_soon(one, i)
    except* Exception as failures:
        raise failures.exceptions[0] from None
    return done  # type: ignore[return-value]


async def merged(streams: Sequence[AsyncIterator[TokenDelta]]) -> AsyncIterator[tuple[int, TokenDelta]]:
    """(choice index, delta) from every stream as each comes; ends when all have. Closing it closes them all."""
    arrivals: asyncio.Queue[tuple[int, TokenDelta | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for delta in streams[i]:
                await arrivals.put((i, delta))
        finally:
            arrivals.put_nowait((i, None))

    pumps = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        left = len(streams)
        while left:
            i, delta = await arrivals.get()
            if delta is None:
                left -= 1
            else:
                yield i, delta
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await close_all(streams)


async def close_all(streams: Sequence[AsyncIterator[TokenDelta]]) -> None:
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]


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

    def __init__(self, content: AsyncIterator[str], *, sources: Sequence[AsyncIterator[TokenDelta]]):
        # no-cache and X-Accel-Buffering: proxies (nginx) must pass each event on as it comes
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sources = sources

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await close_all(self.sources)
