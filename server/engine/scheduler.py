"""Admission and the continuous-batching loop.

Requests arrive at any time from any thread. A dedicated engine thread runs
`step()` in a loop: schedule (admit waiting requests under the row and KV
budgets), execute (one forward: a prefill of the admitted rows, else a decode
of the running batch), update (sample, stream tokens, drop finished rows).
The asyncio event loop only enqueues and reads; it never waits on a forward.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from server.config import EngineSettings
from server.engine.adapters import LoadedAdapter
from server.engine.backbone import Backbone
from server.engine.batch import Batch, PrefillShape, kv_columns
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import (
    EngineStopped,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    TokenDelta,
)
from server.engine.residency import Lease, Residency
from server.engine.runner import ModelRunner
from server.engine.sampling import make_generator, sample

log = logging.getLogger(__name__)

Sink = Callable[[TokenDelta], None]


class Generation:
    """One request's live state: the row a Batch holds. Touched by the engine thread, except `cancel`."""

    def __init__(self, request: GenerationRequest, lease: Lease, sink: Sink, backbone: Backbone):
        self.request = request
        self.lease = lease  # pins the task version on the device until this row ends
        self.adapter: LoadedAdapter | None = lease.adapter
        self.prompt_ids = request.prompt_ids
        self.sampling = request.sampling
        self.sink = sink
        self.generator = make_generator(request.sampling, backbone.device)
        self.eos_ids = frozenset() if request.sampling.ignore_eos else backbone.eos_token_ids
        self.detokenizer = (
            IncrementalDetokenizer(backbone.tokenizer, request.prompt_ids, request.sampling.stop)
            if backbone.tokenizer is not None
            else None
        )
        self.output_ids: list[int] = []
        self.cancelled = False  # set from any thread; read by the engine thread at the next step

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def kv_need(self) -> int:
        """KV columns this row may occupy at its longest."""
        return kv_columns(self) + self.sampling.max_new_tokens

    @property
    def remaining(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)

    def accept(self, token: int) -> TokenDelta:
        """Record one sampled token and say whether the row is done."""
        self.output_ids.append(token)
        text = self.detokenizer.push(token) if self.detokenizer else ""
        reason = None
        if token in self.eos_ids or (self.detokenizer is not None and self.detokenizer.stopped):
            reason = "stop"
        elif self.remaining <= 0:
            reason = "length"
        if reason:
            text += self.detokenizer.finish() if self.detokenizer is not None else ""
            self.lease.release()
        return self._delta([token], text, reason)

    def _delta(self, token_ids: list[int], text: str, reason: str | None, error: str | None = None) -> TokenDelta:
        return TokenDelta(
            token_ids=token_ids,
            text=text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            task_version=None if self.adapter is None else self.adapter.key,
            error=error,
        )

    def end(self, reason: str, error: str | None = None) -> None:
        """Close the stream without a token (cancelled, or a fault in the step)."""
        self.lease.release()
        self.sink(self._delta([], "", reason, error))


async def _stream(deltas: asyncio.Queue[TokenDelta], generation: Generation) -> AsyncIterator[TokenDelta]:
    try:
        while True:
            delta = await deltas.get()
            yield delta
            if delta.finish_reason is not None:
                return
    finally:
        generation.cancel()


@dataclass
class StepPlan:
    """What one engine step does: schedule's output, execute's input."""

    prefill: list[Generation] = field(default_factory=list)  # admitted now; prefilled, then join the batch
    decode: bool = False  # no admission: one decode step for the running batch


class Scheduler:
    """FIFO admission under the row and KV-column budgets. No tensors here."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.waiting: deque[Generation] = deque()
        self._lock = threading.Lock()

    def add(self, generation: Generation) -> None:
        with self._lock:
            if len(self.waiting) >= self.settings.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry later")
            self.waiting.append(generation)

    def drain(self) -> list[Generation]:
        """Take every waiting request out of the queue (at shutdown)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        return waiting

    def schedule(self, running: Batch | None) -> StepPlan:
        rows = len(running) if running else 0
        length = running.length if running else 0  # KV columns the running batch already spans
        remaining = max((g.remaining for g in running.rows), default=0) if running else 0
        admitted: list[Generation] = []
        with self._lock:
            while self.waiting:
                candidate = self.waiting[0]
                if candidate.cancelled:
                    self.waiting.popleft()
                    candidate.end("cancelled")
                    continue
                width = PrefillShape.of([*admitted, candidate])
                future = max(length, width.prefix + width.query) + max(remaining, candidate.remaining)
                if rows + 1 > self.settings.max_batch_size or (rows + 1) * future > self.settings.max_kv_tokens:
                    break
                admitted.append(self.waiting.popleft())
                rows, remaining = rows + 1, max(remaining, candidate.remaining)
        return StepPlan(prefill=admitted, decode=not admitted and running is not None)


class Engine:
    """The frozen backbone serving every task; `submit` from any thread, `generate` from asyncio."""

    def __init__(self, backbone: Backbone, settings: EngineSettings | None = None, residency: Residency | None = None):
        self.backbone = backbone
        self.settings = settings or EngineSettings()
        self.residency = residency or Residency(backbone)
        self.runner = ModelRunner(backbone, lora_backend=self.settings.lora_backend)
        self.scheduler = Scheduler(self.settings)
        self.running: Batch | None = None
        self.steps = 0
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._in_flight: list[Generation] = []  # rows of the step being executed, failed together on a fault

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="taskserve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_running(EngineStopped("the engine stopped"))
        for generation in self.scheduler.drain():
            generation.end("error", error="the engine stopped")

    def run_until_idle(self) -> None:
        """Step on the caller's thread until nothing runs or waits (tests and tools; not with start())."""
        while self.running is not None or self.scheduler.waiting:
            self.step()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- requests ---------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink, lease: Lease | None = None) -> Generation:
        """Queue a request; bad input or a full queue raise here and leave the running batch alone.

        `lease` pins the task's adapter (see `Residency.acquire_async`); without one, the adapter is
        acquired here, which waits for a load: fine off the event loop, as in tests and tools.
        """
        if self._stopping.is_set():
            raise EngineStopped("the engine has stopped")
        lease = lease or self.residency.acquire(request.task_id)
        generation = Generation(request, lease, sink, self.backbone)
        try:
            self._validate(generation)
            self.scheduler.add(generation)
        except BaseException:
            lease.release()
            raise
        self._wakeup.set()
        return generation

    def generate(self, request: GenerationRequest, lease: Lease | None = None) -> AsyncIterator[TokenDelta]:
        """Submit now (bad input and a full queue raise here), then stream the deltas in asyncio.

        Leaving the iteration early, or the task being cancelled, cancels the row.
        """
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[TokenDelta] = asyncio.Queue()

        def sink(delta: TokenDelta) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
            except RuntimeError:  # the event loop is gone: nobody reads this row any more
                generation.cancel()

        generation = self.submit(request, sink, lease)
        stream = _stream(deltas, generation)
        weakref.finalize(stream, generation.cancel)  # a stream dropped before its first read never runs its finally
        return stream

    def complete(self, request: GenerationRequest, timeout: float | None = None) -> TokenDelta:
        """Blocking convenience: run one request to the end and return its whole output as one delta."""
        deltas: queue.Queue[TokenDelta] = queue.Queue()
        generation = self.submit(request, deltas.put)
        token_ids, text = [], []
        while True:
            delta = deltas.get(timeout=timeout)
            token_ids += delta.token_ids
            text.append(delta.text)
            if delta.finish_reason is not None:
                break
        generation.cancel()
        return TokenDelta(
            token_ids=token_ids,
            text="".join(text),
            finish_reason=delta.finish_reason,
            prompt_tokens=delta.prompt_tokens,
            completion_tokens=delta.completion_tokens,
            task_version=delta.task_version,
            error=delta.error,
        )

    def _validate(self, generation: Generation) -> None:
        sampling, limit = generation.sampling, self.backbone.geometry.context_length
        if not generation.prompt_ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.backbone.geometry.vocab_size
        if not all(0 <= t < vocab for t in generation.prompt_ids):
            raise InvalidRequest(f"prompt token ids must lie in [0, {vocab})")
        asked, allowed = sampling.max_new_tokens, self.settings.max_new_tokens
        if asked > allowed:
            raise InvalidRequest(f"max_new_tokens={asked} exceeds this server's limit of {allowed}")
        if generation.kv_need > limit:
            virtual = kv_columns(generation) - len(generation.prompt_ids)
            raise InvalidRequest(
                f"prompt ({len(generation.prompt_ids)} tokens + {virtual} virtual) + max_new_tokens ({asked}) "
                f"exceeds the context length of {limit}"
            )
        if generation.kv_need > self.settings.max_kv_tokens:
            raise InvalidRequest(
                f"this request needs {generation.kv_need} KV columns; the server allows {self.settings.max_kv_tokens}"
            )
        if sampling.stop and generation.detokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer, and this backbone has none")

    # --- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if self.running is None and not self.scheduler.waiting:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # a fault in a forward: fail those rows, keep serving
                log.exception("engine step failed")
                self._fail_running(exc)

    @torch.inference_mode()
    def step(self) -> None:
        """Schedule, execute, update."""
        self._drop_cancelled()
        plan = self.scheduler.schedule(self.running)
        if plan.prefill:
            self._in_flight = plan.prefill
            self._prefill_templates(plan.prefill)
            batch, logits = Batch.prefill(plan.prefill, self.runner)
        elif plan.decode:
            self._in_flight = self.running.rows
            batch, logits = self.running, self.running.decode(self.runner)
        else:
            return
        keep = self._update(batch, logits)
        batch = batch.filter(keep) if len(keep) < len(batch) else batch
        parts = [b for b in (self.running if plan.prefill else None, batch) if b is not None and len(b)]
        self.running = Batch.concatenate(parts) if parts else None
        self._in_flight = []
        self.steps += 1

    def _prefill_templates(self, generations: list[Generation]) -> None:
        """A template task's leading tokens are prefilled once, here on the engine thread, and reused."""
        for generation in generations:
            adapter = generation.adapter
            if adapter is not None and adapter.needs_template_kv:
                adapter.prefix_kv = self.runner.prefix_kv(adapter.template_ids)

    def _update(self, batch: Batch, logits: torch.Tensor) -> list[int]:
        """Sample, stream each row's delta, and return the rows that go on."""
        rows = batch.rows
        tokens = sample(logits, [g.sampling for g in rows], [g.generator for g in rows])
        batch.next_tokens = tokens
        keep = []
        for i, (generation, token) in enumerate(zip(rows, tokens.tolist())):
            delta = generation.accept(token)
            generation.sink(delta)
            if delta.finish_reason is None:
                keep.append(i)
        return keep

    def _drop_cancelled(self) -> None:
        if self.running is None:
            return
        keep = [i for i, g in enumerate(self.running.rows) if not g.cancelled]
        if len(keep) == len(self.running):
            return
        for g in self.running.rows:
            if g.cancelled:
                g.end("cancelled")
        self.running = self.running.filter(keep) if keep else None

    def _fail_running(self, exc: Exception) -> None:
        rows = list(self._in_flight) + (self.running.rows if self.running else [])
        for generation in {id(g): g for g in rows}.values():
            generation.end("error", error=str(exc))
        self.running = None
        self._in_flight = []
