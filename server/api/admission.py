"""Admission that protects latency: a request the server cannot start soon is refused at once (429 + Retry-After).

A bounded queue alone turns overload away too late: a full queue of 1,024 requests on a CPU is minutes of waiting,
and every client times out before its turn. Instead each request is admitted only when its estimated wait for a
place in the batch is within `max_queue_wait` seconds. The estimate (`estimated_wait`) is one small pure function
of how many requests are in the system (admitted and not finished: running, being prefilled, or waiting), the
batch-size limit, how long an engine step takes (the engine's own recent mean, or the gap between two tokens of a row
until it has one) and how many tokens a row generates before it leaves (measured as tokens stream out).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from server.api.quotas import Quotas
from server.engine.engine import Engine
from server.engine.request import QueueFull

SMOOTHING = 0.1  # weight of the newest observation in the running means (about the last 10 count)


class Overloaded(QueueFull):
    """The estimated wait is past `max_queue_wait` (HTTP 429; `retry_after` seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Load:
    """What the estimate is made of, read at one instant."""

    in_system: int  # requests admitted and not finished: running, being prefilled, or waiting for a row
    max_rows: int  # the batch-size limit
    step_seconds: float | None  # recent mean duration of one engine step (one forward); None: not measured yet
    tokens_per_row: float  # mean tokens a row generates before it leaves the batch (its steps in the batch)


def estimated_wait(load: Load) -> float:
    """Seconds a request arriving now waits for its first forward.

    Requests ahead of it beyond the batch's rows must wait for rows to finish; a row holds its place for
    `tokens_per_row` steps and `max_rows` rows run side by side, so a place frees up every
    `tokens_per_row * step_seconds / max_rows` seconds. A cold server, which has not measured a step yet, takes
    what fits in the batch and counts anything more as an unbounded wait: a burst at start-up is not queued for
    minutes before the first tokens show how long steps take.
    """
    ahead = load.in_system + 1 - load.max_rows
    if ahead <= 0:
        return 0.0
    if load.step_seconds is None:
        return math.inf
    return ahead * load.tokens_per_row * load.step_seconds / load.max_rows


class Ticket:
    """One admitted request's place in the count; `release` (idempotent) when it ends, however it ends."""

    def __init__(self, admission: Admission):
        self._admission: Admission | None = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.left()


class Admission:
    """Decides each request at arrival; learns step time and row length from the generations it sees. Thread-safe."""

    def __init__(self, max_wait: float):
        self.max_wait = max_wait
        self.quotas = Quotas()  # tenants' and keys' limits, checked before the load; replaced once the store opens
        self._lock = threading.Lock()
        self._in_system = 0
        self._step_seconds: float | None = None  # between two tokens of one row: one engine step
        self._tokens_per_row: float | None = None  # measured; until then the mean asked for
        self._asked: float | None = None

    def admit(self, engine: Engine, max_new_tokens: int) -> Ticket:
        """A ticket for this request, or `Overloaded` if it would wait longer than `max_wait` for a place."""
        stats = engine.stats()
        engine_count = stats.waiting + stats.running
        with self._lock:
            self._asked = _mean(self._asked, max_new_tokens)
            load = Load(
                in_system=max(self._in_system, engine_count),  # the engine's count sees requests from elsewhere too
                max_rows=engine.settings.max_batch_size,
                step_seconds=stats.step_seconds if stats.steps else self._step_seconds,  # the engine's own timing
                tokens_per_row=self._tokens_per_row if self._tokens_per_row is not None else self._asked,
            )
            wait = estimated_wait(load)
            if wait <= self.max_wait:
                self._in_system += 1
                return Ticket(self)
        if math.isinf(wait):
            raise Overloaded("the server is overloaded: the batch is full and it is still starting; retry shortly", 1)
        raise Overloaded(
            f"the server is overloaded: a new request would wait about {wait:.0f} s for a place in the batch "
            f"(the limit is {self.max_wait:g} s); retry later",
            retry_after=max(1, math.ceil(wait - self.max_wait)),
        )

    @property
    def in_system(self) -> int:
        """Requests admitted here and not finished yet."""
        with self._lock:
            return self._in_system

    def left(self) -> None:
        with self._lock:
            self._in_system -= 1

    def step(self, seconds: float) -> None:
        """The time between two consecutive tokens of one row: one engine step."""
        with self._lock:
            self._step_seconds = _mean(self._step_seconds, seconds)

    def finished(self, completion_tokens: int) -> None:
        """A generation ended after `completion_tokens` tokens (its row's steps in the batch)."""
        with self._lock:
            self._tokens_per_row = _mean(self._tokens_per_row, max(1, completion_tokens))


def _mean(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * value
