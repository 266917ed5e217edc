"""What goes into the engine and what comes out, and the engine's typed errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from adapters_store import AdapterKey
from adapters_store.base import BASE_TASK  # noqa: F401  (re-exported: the reserved id of the bare backbone)
from server.engine.sampling import SamplingParams

MAX_ADAPTER_SCALE = 2.0
FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineError(Exception):
    """Base of the engine's domain errors; the API maps each to one HTTP status."""


class InvalidRequest(EngineError, ValueError):
    """The request cannot be served as asked (HTTP 400); `param` names the field at fault, when one is, and `code`
    says why in a word where OpenAI has one (`context_length_exceeded`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class UnknownTask(EngineError, KeyError):
    """No such task is registered (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown task"


class QueueFull(EngineError):
    """Too many requests are waiting; retry later (HTTP 429)."""


class EngineStopped(EngineError):
    """The engine is not running (HTTP 503)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    task_id: str = BASE_TASK
    version: int | None = None  # a stored version of the task; None: its current one
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # weights the task's per-layer delta (LoRA family, IA³) for this request only: 0 = the backbone, 1 = as trained
    adapter_scale: float = 1.0


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under its row's own distribution (after its adapter, before
    temperature, top-k/top-p and penalties), with the `top` most likely tokens of that distribution."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), most likely first


@dataclass(frozen=True)
class TokenDelta:
    """One step's output for one request; the last one carries `finish_reason`."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    task_version: AdapterKey | None = None  # the task version the row ran on
    error: str | None = None  # set with finish_reason "error"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    # in the first delta, when the request asked: one per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_ids: tuple[int, ...] | None = None  # in the first delta: the tokens the row was prefilled with (echo)
    queue_seconds: float | None = None  # in the first delta: how long the row waited in the queue for the batch

    @property
    def fingerprint(self) -> str | None:
        """`task@version` of the weights that produced it (OpenAI's `system_fingerprint`)."""
        return None if self.task_version is None else str(self.task_version)
