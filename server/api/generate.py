"""Native generation: `POST /v1/tasks/{task_id}/generate`, JSON or server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request

from server.api import logprobs
from server.api.auth import AuthorizedRoute, CallerDep, InferenceAccess
from server.api.deps import AdmissionDep, EngineDep, MetricsDep
from server.api.inference import (
    SSE_EVENT,
    EventStream,
    collect,
    sampling_params,
    start_generation,
    task_version,
    unless_disconnected,
)
from server.api.schemas import ErrorBody, GenerateRequest, GenerateResponse, StreamDelta, StreamEnd, Usage
from server.engine.request import TokenDelta

router = APIRouter(prefix="/v1/tasks", tags=["generate"], route_class=AuthorizedRoute, dependencies=[InferenceAccess])

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 429, 500, 503)}
STREAMED = {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": "JSON, or events with `stream`"}


@router.post("/{task_id:path}/generate", response_model=GenerateResponse, responses={200: STREAMED, **ERRORS})
async def generate(
    task_id: Annotated[str, Path(examples=["base"], description="a task id; `base` is the backbone alone")],
    body: GenerateRequest,
    request: Request,
    engine: EngineDep,
    metrics: MetricsDep,
    admission: AdmissionDep,
    caller: CallerDep,
):
    """Generate with one task; `base` is the frozen backbone alone. With `stream`, server-sent events."""
    sampling = sampling_params(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
        ignore_eos=body.ignore_eos,
        logprobs=body.top_logprobs if body.logprobs else None,
        prompt_logprobs=body.top_logprobs if body.prompt_logprobs else None,
        constraint=None if body.structured_outputs is None else body.structured_outputs.constraint(),
        **body.controls(),
    )
    messages = None if body.messages is None else [m.model_dump() for m in body.messages]
    deltas = await start_generation(
        engine,
        task_id,
        sampling,
        prompt=body.prompt,
        messages=messages,
        version=body.version,
        metrics=metrics,
        admission=admission,
        caller=caller,
        adapter_scale=body.adapter_scale,
    )
    tokenizer = engine.backbone.tokenizer
    if body.stream:
        return EventStream(_events(task_id, deltas, tokenizer), sources=[deltas])
    done = await unless_disconnected(request, collect(deltas))
    return GenerateResponse(
        task_id=task_id,
        version=done.version,
        text=done.text,
        token_ids=done.token_ids,
        finish_reason=done.last.finish_reason,
        usage=Usage(prompt_tokens=done.last.prompt_tokens, completion_tokens=done.last.completion_tokens),
        logprobs=logprobs.native(tokenizer, done.logprobs) if body.logprobs else None,
        prompt_logprobs=_prompt_logprobs(tokenizer, done.first),
    )


def _prompt_logprobs(tokenizer, delta: TokenDelta) -> list[dict | None] | None:
    return None if delta.prompt_logprobs is None else logprobs.native(tokenizer, delta.prompt_logprobs)


async def _events(task_id: str, deltas: AsyncIterator[TokenDelta], tokenizer) -> AsyncIterator[str]:
    async for delta in deltas:
        if delta.finish_reason not in (None, "stop", "length"):
            message = f"generation failed: {delta.error or delta.finish_reason}"
            body = ErrorBody(error={"type": "internal", "message": message})
            yield f"event: error\ndata: {body.model_dump_json()}\n\n"
            return
        if delta.token_ids or delta.text or delta.prompt_logprobs is not None:
            event = StreamDelta(
                text=delta.text,
                token_ids=delta.token_ids,
                logprobs=None if delta.logprobs is None else logprobs.native(tokenizer, delta.logprobs),
                prompt_logprobs=_prompt_logprobs(tokenizer, delta),
            )
            yield f"data: {event.model_dump_json(exclude_none=True)}\n\n"
        if delta.finish_reason is not None:
            end = StreamEnd(
                task_id=task_id,
                version=task_version(delta),
                finish_reason=delta.finish_reason,
                usage=Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens),
            )
            yield f"data: {end.model_dump_json()}\n\n"
