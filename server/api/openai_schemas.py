"""Request and response bodies of the OpenAI-compatible routes, in OpenAI's own field names and shapes.

Parameters OpenAI clients commonly send that this server cannot honour are declared so that their default values
pass and anything else is a 400 naming the parameter, instead of being silently ignored. Unknown fields are
ignored, as newer clients add fields faster than any server follows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

from server.api.fields import Temperature, Text, TopK, TopP

FinishReason = Literal["stop", "length"]

# parameter -> the values that mean "off"; any other value is refused with a 400
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
NOT_SUPPORTED = Field(default=None, description="not supported: only the default (off) is accepted")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

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
    n: int = Field(default=1, description="only 1")
    ignore_eos: bool = Field(default=False, description="extension: keep generating past EOS (benchmarks)")
    user: str | None = Field(default=None, description="accepted and ignored")
    frequency_penalty: Any = NOT_SUPPORTED
    presence_penalty: Any = NOT_SUPPORTED
    logit_bias: Any = NOT_SUPPORTED

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator(*UNSUPPORTED, check_fields=False)
    @classmethod
    def _off(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in UNSUPPORTED[info.field_name]:
            raise ValueError(f"{info.field_name!r} is not supported by this server; leave it out")
        return value

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
        extra="ignore",
        json_schema_extra={"examples": [{"model": "base", "prompt": "Once upon a time", "max_tokens": 8}]},
    )

    prompt: Text | list[Text] = Field(description="a string, or a list of exactly one string")
    max_tokens: int | None = Field(default=16, ge=1, description="default 16")
    echo: Any = NOT_SUPPORTED
    best_of: Any = NOT_SUPPORTED
    suffix: Any = NOT_SUPPORTED
    logprobs: Any = NOT_SUPPORTED

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("only one prompt per request: a string, or a list of one string")
        return prompt

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]
    name: str | None = Field(default=None, description="accepted and ignored")

    def native(self) -> dict[str, str]:
        """What the chat template takes: developer messages are system messages; text parts are joined."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}]
        },
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="default: what the context leaves")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="wins over max_tokens")
    logprobs: Any = NOT_SUPPORTED
    top_logprobs: Any = NOT_SUPPORTED
    tools: Any = NOT_SUPPORTED
    tool_choice: Any = NOT_SUPPORTED
    response_format: Any = NOT_SUPPORTED

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


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
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = Field(default=None, description="the task version that served: task@version")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


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
