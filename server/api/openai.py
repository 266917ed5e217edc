"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`model` names a task; `base` or the backbone's name is the backbone alone. Sampling keeps OpenAI's semantics
(temperature defaults to 1; completions default to 16 tokens; chat to what the context leaves). Errors use OpenAI's
body shape (see `OpenAIRoute`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from adapters_store import TASK_ID, TaskNotFound
from server.api.auth import AuthorizedRoute, InferenceAccess
from server.api.deps import AdmissionDep, EngineDep, MetricsDep, TasksDep
from server.api.inference import (
    SSE_EVENT,
    EventStream,
    collect,
    sampling_params,
    start_generation,
    unless_disconnected,
)
from server.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    Model,
    ModelList,
    OpenAIError,
    OpenAIErrorDetail,
    SamplingFields,
)
from server.engine.engine import Engine
from server.engine.request import BASE_TASK, InvalidRequest, TokenDelta, UnknownTask
from server.engine.sampling import SamplingParams
from server.tenants import Caller


class OpenAIRoute(AuthorizedRoute):
    """Errors on these routes use OpenAI's body shape (see `errors.error_response`)."""

    openai_errors = True


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[InferenceAccess])

ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 408, 413, 429, 500, 503)}
STREAMED = {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": "JSON, or events with `stream`"}
SEED_SPACE = 2**64  # OpenAI seeds are signed 64-bit; ours are unsigned: negatives wrap


def task_for(engine: Engine, model: str) -> str:
    """The task a `model` names: `base` and the backbone's name are the backbone alone."""
    if model in (BASE_TASK, engine.backbone.name):
        return BASE_TASK
    if TASK_ID.fullmatch(model) is None:
        raise _no_such_model(engine, model)
    return model


def _no_such_model(engine: Engine, model: str) -> UnknownTask:
    return UnknownTask(f"the model {model!r} does not exist: name a task id, 'base' or {engine.backbone.name!r}")


def _sampling(body: SamplingFields, max_tokens: int, server_limit: int) -> SamplingParams:
    if max_tokens > server_limit:
        raise InvalidRequest(f"max_tokens={max_tokens} exceeds this server's limit of {server_limit}")
    return sampling_params(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=None if body.seed is None else body.seed % SEED_SPACE,
        stop=body.stop_strings,
        ignore_eos=body.ignore_eos,
    )


async def _start(engine: Engine, body: SamplingFields, sampling: SamplingParams, metrics, admission, **inputs):
    try:
        task_id = task_for(engine, body.model)
        return await start_generation(engine, task_id, sampling, metrics=metrics, admission=admission, **inputs)
    except (UnknownTask, TaskNotFound):
        raise _no_such_model(engine, body.model) from None


def _caller(request: Request) -> Caller:
    return request.state.caller  # set by the route's access check


@dataclass(frozen=True)
class _Reply:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> _Reply:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def _usage(delta: TokenDelta) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=delta.completion_tokens,
        total_tokens=delta.prompt_tokens + delta.completion_tokens,
    )


@router.post("/completions", response_model=Completion, responses={200: STREAMED, **ERRORS})
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, metrics: MetricsDep, admission: AdmissionDep
):
    """OpenAI text completion: `prompt` continued by the task `model`. With `stream`, server-sent events."""
    limit = engine.settings.max_new_tokens
    sampling = _sampling(body, 16 if body.max_tokens is None else body.max_tokens, limit)
    deltas = await _start(engine, body, sampling, metrics, admission, prompt=body.prompt_text, caller=_caller(request))
    reply = _Reply.new("cmpl", body.model)
    if body.stream:
        return EventStream(_completion_events(reply, deltas, body.include_usage), source=deltas)
    done = await unless_disconnected(request, collect(deltas))
    return Completion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=[CompletionChoice(text=done.text, finish_reason=done.last.finish_reason)],
        usage=_usage(done.last),
        system_fingerprint=done.last.fingerprint,
    )


@router.post("/chat/completions", response_model=ChatCompletion, responses={200: STREAMED, **ERRORS})
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, metrics: MetricsDep, admission: AdmissionDep
):
    """OpenAI chat completion: `messages` through the backbone's chat template, answered by the task `model`."""
    limit = engine.settings.max_new_tokens
    sampling = _sampling(body, limit if body.limit is None else body.limit, limit)
    messages = [m.native() for m in body.messages]
    deltas = await _start(
        engine,
        body,
        sampling,
        metrics,
        admission,
        messages=messages,
        fill_context=body.limit is None,
        caller=_caller(request),
    )
    reply = _Reply.new("chatcmpl", body.model)
    if body.stream:
        return EventStream(_chat_events(reply, deltas, body.include_usage), source=deltas)
    done = await unless_disconnected(request, collect(deltas))
    return ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=[ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.last.finish_reason)],
        usage=_usage(done.last),
        system_fingerprint=done.last.fingerprint,
    )


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request, engine: EngineDep, tasks: TasksDep):
    """The backbone, then every task, in id order."""
    caller = _caller(request)
    found = await run_in_threadpool(lambda: [t for t in tasks.iter_tasks() if caller.sees(t.task_id)])
    base = Model(id=engine.backbone.name, created=request.app.state.started_at)
    return ModelList(data=[base, *(Model(id=t.task_id, created=int(t.current.created_at)) for t in found)])


@router.get("/models/{model:path}", response_model=Model, responses=ERRORS)
async def get_model(model: str, request: Request, engine: EngineDep, tasks: TasksDep):
    """One model: the backbone, or a task (404 `model_not_found` otherwise)."""
    task_id = task_for(engine, model)
    if task_id == BASE_TASK:
        return Model(id=model, created=request.app.state.started_at)
    try:
        if not _caller(request).sees(task_id):
            raise TaskNotFound(task_id)
        info = await run_in_threadpool(tasks.info, task_id)
    except KeyError:  # TaskNotFound
        raise _no_such_model(engine, model) from None
    return Model(id=model, created=int(info.current_info.created_at))


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _failure(delta: TokenDelta) -> str | None:
    """An error event for a generation the engine failed, else None."""
    if delta.finish_reason in (None, "stop", "length"):
        return None
    detail = OpenAIErrorDetail(
        message=f"generation failed: {delta.error or delta.finish_reason}", type="server_error", code="internal"
    )
    return _sse(OpenAIError(error=detail))


async def _completion_events(reply: _Reply, deltas: AsyncIterator[TokenDelta], include_usage: bool):
    def chunk(text: str, finish=None, usage=None, fingerprint=None, choices=True) -> str:
        body = Completion(
            id=reply.id,
            created=reply.created,
            model=reply.model,
            choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else [],
            usage=usage,
            system_fingerprint=fingerprint,
        )
        return _sse(body)

    async for delta in deltas:
        if (failure := _failure(delta)) is not None:
            yield failure
            break
        if delta.text:
            yield chunk(delta.text, fingerprint=delta.fingerprint)
        if delta.finish_reason is not None:
            yield chunk("", finish=delta.finish_reason, fingerprint=delta.fingerprint)
            if include_usage:
                yield chunk("", usage=_usage(delta), fingerprint=delta.fingerprint, choices=False)
    yield "data: [DONE]\n\n"


async def _chat_events(reply: _Reply, deltas: AsyncIterator[TokenDelta], include_usage: bool):
    def chunk(delta: ChatDelta | None, finish=None, usage=None, fingerprint=None) -> str:
        body = ChatCompletionChunk(
            id=reply.id,
            created=reply.created,
            model=reply.model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)] if delta is not None else [],
            usage=usage,
            system_fingerprint=fingerprint,
        )
        return _sse(body)

    yield chunk(ChatDelta(role="assistant", content=""))
    async for delta in deltas:
        if (failure := _failure(delta)) is not None:
            yield failure
            break
        if delta.text:
            yield chunk(ChatDelta(content=delta.text), fingerprint=delta.fingerprint)
        if delta.finish_reason is not None:
            yield chunk(ChatDelta(), finish=delta.finish_reason, fingerprint=delta.fingerprint)
            if include_usage:
                yield chunk(None, usage=_usage(delta), fingerprint=delta.fingerprint)
    yield "data: [DONE]\n\n"
