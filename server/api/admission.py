"""Admission that protects latency: a request the server cannot start soon is refused at once (429 + Retry-After).

A bounded queue alone turns overload away too late: a full queue of 1,024 requests on a CPU is minutes of waiting,
and every client times out before its turn. Instead each request is admitted only when its estimated wait for a
place in the batch is within `max_queue_wait` seconds. The estimate (`estimated_wait`) is one small pure function
of figures the engine exposes (queue length, running rows, the batch-size limit) and two the API measures as tokens
stream out (how long an engine step takes: the gap between two tokens of a row; how many tokens a row generates
before it leaves). An engine that measures these itself can feed `estimated_wait` directly.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from server.engine.request import QueueFull
from server.engine.scheduler import Engine

SMOOTHING = 0.1  # weight of the newest observation in the running means (about the last 10 count)


class Overloaded(QueueFull):
    """The estimated wait is past `max_queue_wait` (HTTP 429; `retry_after` seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Load:
    """What the estimate is made of, read at one instant."""

    queued: int  # requests waiting for admission
    running: int  # rows in the running batch
    max_rows: int  # the batch-size limit
    step_seconds: float | None  # recent mean duration of one engine step (one forward); None: not measured yet
    tokens_per_row: float  # mean tokens a row generates before it leaves the batch (its steps in the batch)


def estimated_wait(load: Load) -> float:
    """Seconds a request arriving now waits for its first forward.

    Requests ahead of it beyond the free rows must wait for rows to finish; a row holds its place for
    `tokens_per_row` steps and `max_rows` rows run side by side, so a place frees up every
    `tokens_per_row * step_seconds / max_rows` seconds. Unmeasured (a cold server) counts as no wait.
    """
    if load.step_seconds is None:
        return 0.0
    ahead = load.queued + 1 - max(0, load.max_rows - load.running)
    if ahead <= 0:
        return 0.0
    return ahead * load.tokens_per_row * load.step_seconds / load.max_rows


class Admission:
    """Decides each request at arrival; learns step time and row length from the generations it sees. Thread-safe."""

    def __init__(self, max_wait: float):
        self.max_wait = max_wait
        self._lock = threading.Lock()
        self._step_seconds: float | None = None  # between two tokens of one row: one engine step
        self._tokens_per_row: float | None = None  # measured; until then the mean asked for
        self._asked: float | None = None

    def admit(self, engine: Engine, max_new_tokens: int) -> None:
        """Raise `Overloaded` if this request would wait longer than `max_wait` for a place in the batch."""
        running = engine.running  # one read: the engine thread may swap it meanwhile
        with self._lock:
            self._asked = _mean(self._asked, max_new_tokens)
            load = Load(
                queued=len(engine.scheduler.waiting),
                running=len(running) if running is not None else 0,
                max_rows=engine.settings.max_batch_size,
                step_seconds=self._step_seconds,
                tokens_per_row=self._tokens_per_row if self._tokens_per_row is not None else self._asked,
            )
        wait = estimated_wait(load)
        if wait > self.max_wait:
            raise Overloaded(
                f"the server is overloaded: a new request would wait about {wait:.0f} s for a place in the batch "
                f"(the limit is {self.max_wait:g} s); retry later",
                retry_after=max(1, math.ceil(wait - self.max_wait)),
            )

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
