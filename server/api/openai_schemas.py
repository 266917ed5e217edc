"""Request and response bodies of the OpenAI-compatible routes, in OpenAI's own field names and shapes.

Strict by default: a field the schema does not declare is a 400 `unknown_parameter` naming it, and a field declared
only to be refused (`REFUSED`) passes at its "off" value and is a 400 `unsupported_parameter` otherwise. A client
therefore never gets output that silently differs from what it asked for. `docs/api.md` lists every field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

from server.api.fields import MAX_LOGPROBS, Temperature, Text, TopK, TopP, unsupported
from server.api.schemas import SamplingControls
from server.api.structured import (
    GuidedFields,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolCalls,
    ToolChoice,
    one_constraint,
    response_format_constraint,
)
from server.engine.grammar import Constraint

FinishReason = Literal["stop", "length", "tool_calls"]

# parameter -> (the values that mean "off", why any other value is refused)
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((None, 1), "ask for n choices instead (vLLM's V1 engine refuses best_of too)"),
    "suffix": ((None, ""), "inserting text needs a fill-in-the-middle model"),
}
REFUSED_FIELD = Field(default=None, description="refused: only the default (off) is accepted")


class Strict(BaseModel):
    """A request body: an undeclared field is a 400 naming it, never silently dropped."""

    model_config = ConfigDict(extra="forbid")

    @field_validator(*REFUSED, check_fields=False)
    @classmethod
    def _off(cls, value: Any, info: ValidationInfo) -> Any:
        off, why = REFUSED[info.field_name]
        if value not in off:
            raise unsupported(info.field_name, why)
        return value


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict, SamplingControls, GuidedFields):
    """What completions and chat share."""

    model: Text = Field(description="a task id; 'base' or the backbone's name for the backbone alone")
    temperature: Temperature | None = Field(default=None, le=2.0, description="default 1; 0 = greedy")
    top_p: TopP | None = Field(default=None, description="default 1")
    top_k: TopK = Field(default=0, description="extension: 0 = off")
    seed: int | None = Field(
        default=None, ge=-(2**63), lt=2**63, description="a signed 64-bit int: same seed, prompt and task, same tokens"
    )
    stop: Text | list[Text] | None = Field(default=None, description="up to 16 stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, description="choices per prompt, up to the server's max_n; they share one prefill")
    ignore_eos: bool = Field(default=False, description="extension: keep generating past EOS (benchmarks)")
    user: str | None = Field(default=None, description="accepted and ignored")
    response_format: ResponseFormat | None = Field(default=None, description="text, json_object or json_schema")
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="vLLM: one of json, regex, choice, grammar, json_object"
    )

    def constraints(self) -> list[tuple[str, Constraint | None]]:
        """(field, constraint) for every field that may constrain the output."""
        so = self.structured_outputs
        return [
            ("response_format", response_format_constraint(self.response_format)),
            ("structured_outputs", None if so is None else so.constraint()),
            *self.guided(),
        ]

    @property
    def constraint(self) -> Constraint | None:
        """What the output must match, if anything: at most one field may say."""
        return one_constraint(self.constraints())

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "base", "prompt": "Once upon a time", "max_tokens": 8}]},
    )

    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists"
    )
    echo: bool = Field(default=False, description="the prompt before the completion (with its log-probabilities)")
    max_tokens: int | None = Field(default=16, ge=0, description="default 16; 0 with echo scores the prompt")
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="each token's log-probability and this many alternatives"
    )
    best_of: Any = REFUSED_FIELD
    suffix: Any = REFUSED_FIELD

    @field_validator("max_tokens")
    @classmethod
    def _generates_or_echoes(cls, max_tokens: int | None, info: ValidationInfo) -> int | None:
        if max_tokens == 0 and not info.data.get("echo"):
            raise ValueError("0 generates nothing: it scores the prompt, with echo")
        return max_tokens

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and (not prompt or any(p == [] for p in prompt)):
            raise ValueError("an empty list is no prompt")
        return prompt

    @property
    def prompts(self) -> list[dict]:
        """Each prompt as `start_choices` takes it: `{"prompt": text}` or `{"prompt_ids": ids}`, in order."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [{"prompt": prompt}]
        if isinstance(prompt[0], int):
            return [{"prompt_ids": prompt}]
        return [{"prompt": p} if isinstance(p, str) else {"prompt_ids": p} for p in prompt]


class ContentPart(Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(Strict):
    name: str
    arguments: Text = Field(description="the arguments as JSON text")


class ToolCall(Strict):
    """A call the model made: in a response, and sent back in the conversation by the assistant turn that made it."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = Field(default=None, description="accepted; the chat template does not render it")
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(default=None, description="tool: the call this message answers")

    @model_validator(mode="after")
    def _fits_its_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message, and only one, carries tool_call_id: the call it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (an assistant message may carry tool_calls instead)")
        return self

    def native(self, renders_tools: bool = False) -> dict[str, Any]:
        """What the chat template takes: developer messages are system messages; text parts are joined. Calls go
        as `tool_calls` to a template that renders them, and otherwise as the text they were generated as
        (`{"name":...,"arguments":...}`), so the model still sees what it called."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        calls = self.tool_calls or []
        if calls and renders_tools:
            message["tool_calls"] = [c.model_dump() for c in calls]
        elif calls:
            message["content"] = text + "".join(
                f'{{"name":{json.dumps(c.function.name)},"arguments":{c.function.arguments}}}' for c in calls
            )
        return message


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}]
        },
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="default: what the context leaves")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="wins over max_tokens")
    logprobs: bool | None = Field(default=None, description="each generated token's log-probability")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="with logprobs: this many alternatives per token"
    )
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = Field(
        default=None, description="'required' or a named function; 'auto' (the default with tools) is refused"
    )
    parallel_tool_calls: bool | None = Field(default=None, description="accepted: one call is generated")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_asked(self) -> int | None:
        """Alternatives per token when log-probabilities are asked for, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_calls(self) -> ToolCalls | None:
        """The call asked for, if any (a 400 for tool_choice 'auto')."""
        return ToolCalls.of(self.tools, self.tool_choice)

    @property
    def constraint(self) -> Constraint | None:
        calls = self.tool_calls
        return one_constraint([*self.constraints(), ("tools", None if calls is None else calls.constraint)])


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose KV came from a cache: none are (no prefix cache)")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the prompt's first token (echo)")
    top_logprobs: list[dict[str, float] | None] = Field(description="the most likely tokens and the chosen one")
    text_offset: list[int] = Field(description="where each token starts in the choice's text")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A completion, and each chunk of a streamed one (the same shape, as in OpenAI's API)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = Field(default=None, description="the task version that served: task@version")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float = Field(description="under the task's distribution, before temperature, top-k/top-p")
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = Field(default=None, description="the task version that served: task@version")


class SetFieldsOnly(BaseModel):
    """A streamed delta: the fields it sets, nothing else (as OpenAI sends them)."""

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FunctionCallDelta(SetFieldsOnly):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(SetFieldsOnly):
    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(SetFieldsOnly):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "taskserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx)")
    param: str | None = None
    code: str | None = Field(default=None, description="model_not_found, invalid_api_key, or the native error type")


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
