"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    """Either `prompt` or `messages` (the backbone's chat template is applied, generation prompt added)."""

    prompt: str | None = None
    messages: list[Message] | None = None
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 = off")
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


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


class StreamDelta(BaseModel):
    text: str
    token_ids: list[int]


class StreamEnd(BaseModel):
    task_id: str
    version: int | None
    finish_reason: Literal["stop", "length"]
    usage: Usage


class VersionPublic(BaseModel):
    task_id: str
    version: int
    kind: str
    parameters: int
    bytes: int
    sha256: str
    created_at: float
    description: str | None = None


class TaskPublic(BaseModel):
    task_id: str
    version: int = Field(description="the current version")
    kind: str
    parameters: int
    bytes: int
    resident: bool = Field(description="the current version is loaded on the device")
    versions: list[VersionPublic]


class TaskList(BaseModel):
    tasks: list[VersionPublic] = Field(description="each task's current version")
    next_after: str | None = Field(description="pass as ?after= for the next page; null on the last page")


class TemplateUpload(BaseModel):
    """A template task: an instruction and few-shot examples around the user's input."""

    template: dict = Field(
        description="system, instruction, examples [{input, output}], input_prefix, input_suffix, chat"
    )
    description: str | None = None


class Rollback(BaseModel):
    version: int = Field(ge=1)


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
