"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`model` names a task; `base` or the backbone's name is the backbone alone. Sampling keeps OpenAI's semantics
(temperature defaults to 1; completions default to 16 tokens; chat to what the context leaves). Errors use OpenAI's
body shape (see `OpenAIRoute`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from adapters_store import TASK_ID, TaskNotFound
from server.api import logprobs
from server.api.auth import AuthorizedRoute, InferenceAccess
from server.api.deps import AdmissionDep, EngineDep, MetricsDep, TasksDep
from server.api.inference import (
    SSE_EVENT,
    EventStream,
    close_all,
    collect_all,
    merged,
    sampling_params,
    start_choices,
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
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    FunctionCallDelta,
    Model,
    ModelList,
    OpenAIError,
    OpenAIErrorDetail,
    PromptTokensDetails,
    SamplingFields,
    ToolCall,
    ToolCallDelta,
)
from server.api.structured import CallReader, ToolCalls
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


def _sampling(body: SamplingFields, max_tokens: int, server_limit: int, **scoring) -> SamplingParams:
    if max_tokens > server_limit:
        raise InvalidRequest(f"max_tokens={max_tokens} exceeds this server's limit of {server_limit}", "max_tokens")
    return sampling_params(
        **scoring,
        **body.controls(),
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=None if body.seed is None else body.seed % SEED_SPACE,
        stop=body.stop_strings,
        ignore_eos=body.ignore_eos,
        constraint=body.constraint,
    )


def _caller(request: Request) -> Caller:
    return request.state.caller  # set by the route's access check


async def _start(
    engine: Engine,
    body: SamplingFields,
    sampling: SamplingParams,
    metrics,
    admission,
    prompts: list[dict],
    caller: Caller | None = None,
) -> list[AsyncIterator[TokenDelta]]:
    """Every choice of every prompt, in order (prompt-major); a refusal part-way closes what had started."""
    most_n = min(engine.settings.max_n, engine.settings.max_batch_size)
    if sampling.n > most_n:
        raise InvalidRequest(f"n={sampling.n} exceeds this server's limit of {most_n} choices", param="n")
    rows, most = len(prompts) * sampling.n, engine.settings.max_batch_size
    if rows > most:
        raise InvalidRequest(f"{len(prompts)} prompts × n={sampling.n} make {rows} rows; at most {most}", "prompt")
    streams: list[AsyncIterator[TokenDelta]] = []
    try:
        task_id = task_for(engine, body.model)
        for inputs in prompts:
            streams += await start_choices(
                engine,
                task_id,
                sampling,
                metrics=metrics,
                admission=admission,
                caller=caller,
                adapter_scale=body.adapter_scale,
                **inputs,
            )
    except BaseException as exc:
        await close_all(streams)
        if isinstance(exc, UnknownTask | TaskNotFound):
            raise _no_such_model(engine, body.model) from None
        raise
    return streams


@dataclass(frozen=True)
class _Reply:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str
    n: int  # choices per prompt

    @classmethod
    def new(cls, prefix: str, model: str, n: int) -> _Reply:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model, n=n)

    def sse(self, body: type[Completion] | type[ChatCompletionChunk], choices: list, **fields) -> str:
        """One event of a streamed response: `body` with these choices (and `usage`, `system_fingerprint`)."""
        return _sse(body(id=self.id, created=self.created, model=self.model, choices=choices, **fields))

    def ending(self, body, lasts: list[TokenDelta | None], include_usage: bool) -> Iterator[str]:
        """The last events: the usage of every choice (once all have ended, if asked), then `[DONE]`."""
        if include_usage and all(lasts):
            yield self.sse(body, [], usage=self.usage(lasts), system_fingerprint=lasts[0].fingerprint)
        yield "data: [DONE]\n\n"

    def usage(self, lasts: list[TokenDelta]) -> CompletionUsage:
        """Each prompt counts once, however many choices share it; every choice's tokens count."""
        prompt = sum(d.prompt_tokens for d in lasts[:: self.n])
        completion = sum(d.completion_tokens for d in lasts)
        return CompletionUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=0),  # no prefix cache: every token is computed
        )


@router.post("/completions", response_model=Completion, responses={200: STREAMED, **ERRORS})
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, metrics: MetricsDep, admission: AdmissionDep
):
    """OpenAI text completion: each prompt continued by the task `model`, n times. With `stream`, server-sent
    events."""
    if body.max_tokens == 0 and body.n > 1:
        raise InvalidRequest("max_tokens=0 scores the prompt once: n must be 1", param="n")
    limit = engine.settings.max_new_tokens
    sampling = _sampling(
        body,
        16 if body.max_tokens is None else body.max_tokens,
        limit,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,
        n=body.n,
    )
    streams = await _start(engine, body, sampling, metrics, admission, body.prompts, _caller(request))
    reply = _Reply.new("cmpl", body.model, body.n)
    pieces = [_CompletionPieces(engine.backbone.tokenizer, body.echo, body.logprobs is not None) for _ in streams]
    if body.stream:
        return EventStream(_completion_events(reply, streams, body.include_usage, pieces), sources=streams)
    dones = await unless_disconnected(request, collect_all(streams))
    choices = []
    for i, (done, piece) in enumerate(zip(dones, pieces)):
        prompt_text, prompt_scores = piece.prompt(done.first)
        text, scores = piece.tokens(done.text, done.token_ids, done.logprobs)
        logprobs = _joined(prompt_scores, scores)
        choices.append(
            CompletionChoice(index=i, text=prompt_text + text, finish_reason=done.last.finish_reason, logprobs=logprobs)
        )
    return Completion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=choices,
        usage=reply.usage([d.last for d in dones]),
        system_fingerprint=dones[0].last.fingerprint,
    )


@router.post("/chat/completions", response_model=ChatCompletion, responses={200: STREAMED, **ERRORS})
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, metrics: MetricsDep, admission: AdmissionDep
):
    """OpenAI chat completion: `messages` through the backbone's chat template, answered by the task `model`."""
    limit = engine.settings.max_new_tokens
    sampling = _sampling(
        body, limit if body.limit is None else body.limit, limit, logprobs=body.logprobs_asked, n=body.n
    )
    renders_tools = "tool_calls" in (getattr(engine.backbone.tokenizer, "chat_template", None) or "")
    messages = [m.native(renders_tools) for m in body.messages]
    calls = body.tool_calls
    tools = None if calls is None else [t.template() for t in calls.tools]  # for templates that render them
    prompts = [{"messages": messages, "fill_context": body.limit is None, "tools": tools}]
    streams = await _start(engine, body, sampling, metrics, admission, prompts, _caller(request))
    reply = _Reply.new("chatcmpl", body.model, body.n)
    tokenizer = engine.backbone.tokenizer if body.logprobs else None
    if body.stream:
        return EventStream(_chat_events(reply, streams, body.include_usage, tokenizer, calls), sources=streams)
    dones = await unless_disconnected(request, collect_all(streams))
    choices = []
    for i, done in enumerate(dones):
        message, finish = AssistantMessage(content=done.text), done.last.finish_reason
        call = None if calls is None or finish != "stop" else calls.reader().call(done.text)
        if call is not None:
            message, finish = AssistantMessage(content=None, tool_calls=[ToolCall(**call)]), "tool_calls"
        logprobs = _chat_logprobs(tokenizer, done.logprobs)
        choices.append(ChatChoice(index=i, message=message, finish_reason=finish, logprobs=logprobs))
    return ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=reply.model,
        choices=choices,
        usage=reply.usage([d.last for d in dones]),
        system_fingerprint=dones[0].last.fingerprint,
    )


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request, engine: EngineDep, tasks: TasksDep):
    """The backbone, then every task the caller may see, in id order."""
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


class _CompletionPieces:
    """A completion's text and log-probabilities, piece by piece: the echoed prompt, then each delta's tokens, with
    each token's offset in the choice's text running on across pieces."""

    def __init__(self, tokenizer, echo: bool, logprobs: bool):
        self.tokenizer, self.echo, self.logprobs = tokenizer, echo, logprobs
        self.offset = 0

    def prompt(self, first: TokenDelta) -> tuple[str, CompletionLogprobs | None]:
        """The prompt as the model saw it (a template task's wrapping included), when echoed."""
        if not self.echo:
            return "", None
        ids = first.prompt_ids or ()
        text = self.tokenizer.decode(list(ids))
        scored = first.prompt_logprobs or [None] * len(ids)
        return text, self._scores(scored, ids)

    def tokens(self, text: str, token_ids, scored) -> tuple[str, CompletionLogprobs | None]:
        return text, self._scores(scored, token_ids)

    def _scores(self, scored, token_ids) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        shown = logprobs.completion(self.tokenizer, scored, token_ids, self.offset)
        self.offset += sum(map(len, shown["tokens"]))
        return CompletionLogprobs(**shown)


def _joined(*parts: CompletionLogprobs | None) -> CompletionLogprobs | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return CompletionLogprobs(
        **{field: [x for p in present for x in getattr(p, field)] for field in CompletionLogprobs.model_fields}
    )


def _chat_logprobs(tokenizer, scored) -> ChatLogprobs | None:
    return None if tokenizer is None else ChatLogprobs(content=logprobs.chat(tokenizer, scored))


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


async def _events(
    reply: _Reply,
    body: type[Completion] | type[ChatCompletionChunk],
    streams: list[AsyncIterator[TokenDelta]],
    include_usage: bool,
    events_of: Callable[[int, TokenDelta], Iterator[str]],
) -> AsyncIterator[str]:
    """Each choice's deltas as they come, as `events_of(index, delta)` shows them; a failure ends the response."""
    lasts: list[TokenDelta | None] = [None] * len(streams)
    async with aclosing(merged(streams)) as arrivals:
        async for i, delta in arrivals:
            if (failure := _failure(delta)) is not None:
                yield failure
                break
            for event in events_of(i, delta):
                yield event
            if delta.finish_reason is not None:
                lasts[i] = delta
    for event in reply.ending(body, lasts, include_usage):
        yield event


def _completion_events(
    reply: _Reply, streams: list[AsyncIterator[TokenDelta]], include_usage: bool, pieces: list[_CompletionPieces]
) -> AsyncIterator[str]:
    def chunk(i: int, text: str, finish=None, fingerprint=None, logprobs=None) -> str:
        choice = CompletionChoice(index=i, text=text, finish_reason=finish, logprobs=logprobs)
        return reply.sse(Completion, [choice], system_fingerprint=fingerprint)

    def events_of(i: int, delta: TokenDelta) -> Iterator[str]:
        piece, fingerprint = pieces[i], delta.fingerprint
        if delta.prompt_ids is not None and piece.echo:
            text, scores = piece.prompt(delta)
            yield chunk(i, text, fingerprint=fingerprint, logprobs=scores)
        if delta.text or (delta.token_ids and piece.logprobs):
            text, scores = piece.tokens(delta.text, delta.token_ids, delta.logprobs or [])
            yield chunk(i, text, fingerprint=fingerprint, logprobs=scores)
        if delta.finish_reason is not None:
            yield chunk(i, "", finish=delta.finish_reason, fingerprint=fingerprint)

    return _events(reply, Completion, streams, include_usage, events_of)


async def _chat_events(
    reply: _Reply, streams: list[AsyncIterator[TokenDelta]], include_usage: bool, tokenizer, calls: ToolCalls | None
) -> AsyncIterator[str]:
    """`tokenizer` is None unless the request asked for log-probabilities. With `calls`, each choice's output is
    streamed as one tool call: its id and name once the name is known, then its arguments as they come."""
    readers = [None if calls is None else calls.reader() for _ in streams]

    def chunk(i: int, delta: ChatDelta, finish=None, fingerprint=None, logprobs=None) -> str:
        choice = ChatChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=logprobs)
        return reply.sse(ChatCompletionChunk, [choice], system_fingerprint=fingerprint)

    def call_delta(reader: CallReader, text: str, last: bool) -> ChatDelta | None:
        """The call's id and name in its first delta (once the name is known), then its arguments as they come."""
        arguments = reader.push(text, last)
        if reader.name is None or (reader.announced and not arguments):
            return None
        head = {} if reader.announced else {"id": reader.id, "type": "function"}
        function = FunctionCallDelta(name=None if reader.announced else reader.name, arguments=arguments)
        reader.announced = True
        return ChatDelta(tool_calls=[ToolCallDelta(index=0, function=function, **head)])

    def events_of(i: int, delta: TokenDelta) -> Iterator[str]:
        reader, last = readers[i], delta.finish_reason is not None
        scores = _chat_logprobs(tokenizer, delta.logprobs or [])
        if reader is not None:
            shown = call_delta(reader, delta.text, last)
            if shown is not None or (delta.token_ids and tokenizer is not None):
                yield chunk(i, shown or ChatDelta(), fingerprint=delta.fingerprint, logprobs=scores)
        elif delta.text or (delta.token_ids and tokenizer is not None):
            yield chunk(i, ChatDelta(content=delta.text), fingerprint=delta.fingerprint, logprobs=scores)
        if last:
            finish = delta.finish_reason
            if reader is not None and finish == "stop" and reader.complete:
                finish = "tool_calls"
            yield chunk(i, ChatDelta(), finish=finish, fingerprint=delta.fingerprint)

    for i in range(len(streams)):
        yield chunk(i, ChatDelta(role="assistant", content=None if calls is not None else ""))
    async with aclosing(_events(reply, ChatCompletionChunk, streams, include_usage, events_of)) as events:
        async for event in events:
            yield event
