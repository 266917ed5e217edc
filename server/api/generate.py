"""Native generation: `POST /v1/tasks/{task_id}/generate`, JSON or server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.api.deps import EngineDep
from server.api.schemas import ErrorBody, GenerateRequest, GenerateResponse, StreamDelta, StreamEnd, Usage
from server.engine.adapters import LoadedAdapter
from server.engine.adapters.template import render_ids
from server.engine.request import GenerationRequest, InvalidRequest, TokenDelta
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Engine

router = APIRouter(prefix="/v1/tasks", tags=["generate"])

ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 429, 503)}


@router.post("/{task_id}/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(task_id: str, body: GenerateRequest, engine: EngineDep):
    """Generate with one task; `base` is the frozen backbone alone. With `stream`, server-sent events."""
    sampling = _sampling(body)
    lease = await engine.residency.acquire_async(task_id)  # loads the task off the event loop if needed
    try:
        prompt_ids = _encode(engine, body, lease.adapter)
        deltas = engine.generate(GenerationRequest(prompt_ids, sampling, task_id=task_id), lease)
    except BaseException:
        lease.release()
        raise
    if body.stream:
        return StreamingResponse(_events(task_id, deltas), media_type="text/event-stream")
    text, token_ids = [], []
    async for delta in deltas:
        _raise_if_failed(delta)
        text.append(delta.text)
        token_ids += delta.token_ids
    return GenerateResponse(
        task_id=task_id,
        version=_version(delta),
        text="".join(text),
        token_ids=token_ids,
        finish_reason=delta.finish_reason,
        usage=Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens),
    )


def _encode(engine: Engine, body: GenerateRequest, adapter: LoadedAdapter | None) -> tuple[int, ...]:
    tokenizer = engine.backbone.tokenizer
    if adapter is not None and adapter.template is not None:
        if body.prompt is None:
            raise InvalidRequest("template tasks take 'prompt': the input the template wraps")
        return render_ids(adapter, body.prompt, tokenizer)
    if body.messages is not None:
        messages = [m.model_dump() for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        ids = tokenizer.encode(body.prompt)
    if not ids:
        raise InvalidRequest("the prompt is empty")
    return tuple(ids)


def _sampling(body: GenerateRequest) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(body.stop),
            ignore_eos=body.ignore_eos,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _version(delta: TokenDelta) -> int | None:
    return None if delta.task_version is None else int(delta.task_version.rsplit("@", 1)[1])


def _raise_if_failed(delta: TokenDelta) -> None:
    if delta.finish_reason == "error":
        raise RuntimeError(f"generation failed: {delta.error}")


async def _events(task_id: str, deltas: AsyncIterator[TokenDelta]) -> AsyncIterator[str]:
    async for delta in deltas:
        if delta.finish_reason == "error":
            body = ErrorBody(error={"type": "internal", "message": f"generation failed: {delta.error}"})
            yield f"event: error\ndata: {body.model_dump_json()}\n\n"
            return
        if delta.token_ids or delta.text:
            yield f"data: {StreamDelta(text=delta.text, token_ids=delta.token_ids).model_dump_json()}\n\n"
        if delta.finish_reason is not None:
            end = StreamEnd(
                task_id=task_id,
                version=_version(delta),
                finish_reason=delta.finish_reason,
                usage=Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens),
            )
            yield f"data: {end.model_dump_json()}\n\n"
