"""What the server answers, as typed objects. Unknown fields are ignored so a newer server does not break us."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Message",
    "Usage",
    "Generation",
    "StreamEvent",
    "Component",
    "Version",
    "Task",
    "TaskPage",
    "Readiness",
    "ApiKey",
    "NewApiKey",
]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(_Answer):
    role: Literal["system", "user", "assistant"]
    content: str


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int


class Generation(_Answer):
    """One finished generation."""

    task_id: str
    version: int | None = Field(description="the task version that served it; None for 'base'")
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    usage: Usage


class StreamEvent(_Answer):
    """One piece of a streamed generation. Every event but the last carries new text; the last one
    (`finish_reason` set) carries no text but the task version and the usage."""

    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    task_id: str | None = None
    version: int | None = None
    finish_reason: Literal["stop", "length"] | None = None
    usage: Usage | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


class Component(_Answer):
    """One adapter of a composite task."""

    name: str
    kind: str
    scale: float = 1.0


class Version(_Answer):
    """One immutable task version."""

    task_id: str
    version: int
    kind: str = Field(description="lora, prefix_tuning, prompt_tuning, p_tuning, ia3, template, composite, ...")
    components: list[Component] | None = Field(default=None, description="a composite's adapters, in order")
    parameters: int
    bytes: int
    sha256: str
    created_at: float = Field(description="seconds since the epoch")
    description: str | None = None
    unchanged: bool = Field(default=False, description="an upload identical to the current version: nothing stored")


class Task(_Answer):
    """A task: its current version and every version it has."""

    task_id: str
    version: int = Field(description="the current version")
    kind: str
    components: list[Component] | None = None
    parameters: int
    bytes: int
    resident: bool = Field(description="the current version is loaded on the device")
    versions: list[Version]


class TaskPage(_Answer):
    tasks: list[Version]
    next_after: str | None = None


class Readiness(_Answer):
    """GET /ready: `ready` is False while the model loads or the store is unreachable."""

    ready: bool
    status: str
    model: str | None = None
    detail: str | None = None


class ApiKey(_Answer):
    """A tenant's API key as the server lists it: never the key itself."""

    id: str = Field(description="how lists and revocations name the key")
    tenant: str
    scope: Literal["inference", "admin"]
    created_at: float
    description: str | None = None
    requests_per_s: float | None = None
    tokens_per_min: int | None = None


class NewApiKey(ApiKey):
    key: str = Field(description="the key itself, shown only when it is created")
