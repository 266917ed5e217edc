"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.fields import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_TOKENS,
    Seed,
    Temperature,
    Text,
    TopK,
    TopP,
    valid_unicode_tree,
)
from server.api.structured import StructuredOutputs


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class SamplingControls(BaseModel):
    """What both APIs take beyond temperature and top-k/top-p, under vLLM's names (OpenAI's for its own fields)."""

    presence_penalty: float | None = Field(
        default=None, ge=-2, le=2, allow_inf_nan=False, description="subtracted once from every generated token"
    )
    frequency_penalty: float | None = Field(
        default=None, ge=-2, le=2, allow_inf_nan=False, description="subtracted per time a token was generated"
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=100, allow_inf_nan=False, description="divides seen tokens' logits; 1 = off"
    )
    min_p: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False, description="drop tokens under min_p × the top one's probability"
    )
    min_tokens: int = Field(default=0, ge=0, description="no EOS or stop token before this many tokens")
    stop_token_ids: list[int] | None = Field(
        default=None, max_length=MAX_STOP_TOKENS, description="tokens that end the output like EOS"
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias added to its logit"
    )
    include_stop_str_in_output: bool = Field(default=False, description="keep the stop string or token in the text")
    skip_special_tokens: bool = Field(default=True, description="leave special tokens out of the text")
    adapter_scale: float = Field(
        default=1.0,
        ge=0,
        le=2,
        allow_inf_nan=False,
        description="extension: weights the task's per-layer delta (LoRA family, IA³) for this request; "
        "0 = the backbone, 1 = as trained; a task with no per-layer weights takes only 1",
    )

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
        return bias

    def controls(self) -> dict:
        """These fields as `SamplingParams` keyword arguments; what is unset keeps the engine's default."""
        values = {
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_p": self.min_p,
        }
        return {
            **{k: v for k, v in values.items() if v is not None},
            "min_tokens": self.min_tokens,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "logit_bias": tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
        }


class GenerateRequest(SamplingControls):
    """Either `prompt` or `messages` (the backbone's chat template is applied, generation prompt added)."""

    model_config = ConfigDict(
        extra="forbid",  # a field this server does not honour is a 400 naming it, never silently dropped
        json_schema_extra={
            "examples": [
                {"prompt": "Once upon a time", "max_new_tokens": 8},
                {"messages": [{"role": "user", "content": "Name a colour."}], "max_new_tokens": 8, "stream": True},
            ]
        },
    )

    prompt: Text | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    version: int | None = Field(
        default=None, ge=1, description="a stored version of the task to run instead of its current one"
    )
    max_new_tokens: int = Field(default=128, ge=0, description="0 scores the prompt only (with prompt_logprobs)")
    temperature: Temperature = Field(default=0.0, description="0 = greedy; at most 100; (0, 0.01) counts as 0.01")
    top_p: TopP = Field(default=1.0, description="in (0, 1]; 1 = off")
    top_k: TopK = Field(default=0, description="0 = off")
    seed: Seed | None = Field(default=None, description="in [0, 2**64): same seed, prompt and task, same tokens")
    stop: list[Annotated[Text, Field(min_length=1)]] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False
    stream: bool = False
    logprobs: bool = Field(default=False, description="each generated token's log-probability")
    prompt_logprobs: bool = Field(default=False, description="each prompt token's log-probability (the first: null)")
    top_logprobs: int = Field(default=0, ge=0, le=MAX_LOGPROBS, description="the most likely alternatives to each")
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="the output must match: one of json (a schema), regex, choice, grammar, json_object"
    )

    @model_validator(mode="after")
    def one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise ValueError("top_logprobs needs logprobs or prompt_logprobs")
        if self.max_new_tokens == 0 and not self.prompt_logprobs:
            raise ValueError("max_new_tokens=0 generates nothing: it scores the prompt, with prompt_logprobs")
        return self


class TopLogprob(BaseModel):
    token_id: int
    token: str = Field(description="the token's own decoding")
    logprob: float = Field(description="under the task's distribution, before temperature, top-k/top-p")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the most likely tokens at this position, most likely first")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task_id: str
    version: int | None = Field(description="the task version that served the request; null for 'base'")
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    usage: Usage
    logprobs: list[TokenLogprob] | None = Field(default=None, description="with `logprobs`: one per token id")
    prompt_logprobs: list[TokenLogprob | None] | None = Field(
        default=None, description="with `prompt_logprobs`: one per prompt token, null for the first"
    )


class StreamDelta(BaseModel):
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = Field(default=None, description="in the first event")


class StreamEnd(BaseModel):
    task_id: str
    version: int | None
    finish_reason: Literal["stop", "length"]
    usage: Usage


class ComponentPublic(BaseModel):
    name: str = Field(description="its folder in the upload")
    kind: str = Field(description="lora, prefix_tuning, ia3, ...")
    scale: float = Field(description="the weight on its per-layer delta")


class VersionPublic(BaseModel):
    task_id: str
    version: int
    kind: str
    components: list[ComponentPublic] | None = Field(default=None, description="a composite's components, in order")
    parameters: int
    bytes: int
    sha256: str
    created_at: float
    description: str | None = None


class TaskPublic(BaseModel):
    task_id: str
    version: int = Field(description="the current version")
    kind: str
    components: list[ComponentPublic] | None = Field(default=None, description="a composite's components, in order")
    parameters: int
    bytes: int
    resident: bool = Field(description="the current version is loaded on the device")
    versions: list[VersionPublic]


class TaskList(BaseModel):
    tasks: list[VersionPublic] = Field(description="each task's current version")
    next_after: str | None = Field(description="pass as ?after= for the next page; null on the last page")


class TemplateUpload(BaseModel):
    """A template task: an instruction and few-shot examples around the user's input."""

    template: Annotated[dict, AfterValidator(valid_unicode_tree)] = Field(
        description="system, instruction, examples [{input, output}], input_prefix, input_suffix, chat"
    )
    description: Text | None = None


class Rollback(BaseModel):
    version: int = Field(ge=1)


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
