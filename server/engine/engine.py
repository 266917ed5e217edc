"""The engine: one frozen backbone serving every task, stepping on its own thread.

A step is three calls: `schedule` (a pure function of the waiting and running rows: who computes
how many inputs), `ModelRunner.execute` (one forward over the packed rows, then sampling) and
`update` (tokens recorded and streamed, finished rows dropped). Requests arrive from any thread;
the engine thread emits token ids only: detokenising and stop strings happen in each request's
consumer (`generate`, `complete`), which cancels the row when a stop string appears.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from adapters_store import AdapterKey, TaskNotFound
from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.batch import Batch
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.generation import Generation, Sink, shared_leases
from server.engine.grammar import Grammars
from server.engine.kv_cache import KVPool
from server.engine.request import (
    BASE_TASK,
    MAX_ADAPTER_SCALE,
    EngineStopped,
    GenerationRequest,
    InvalidRequest,
    TokenDelta,
    UnknownTask,
)
from server.engine.residency import Lease, Residency
from server.engine.runner import ModelRunner, RunnerOutput
from server.engine.sampling import SEED_LIMIT
from server.engine.scheduler import SchedulerLimits, StepPlan, reserved_blocks, schedule
from server.engine.waiting import WaitingQueue

log = logging.getLogger(__name__)

Resolve = Callable[[str, int | None], AdapterKey | None]  # task id, version or current -> key; None: the backbone


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and admission control; read from any thread."""

    running: int  # rows in the batch
    waiting: int  # requests queued for admission
    kv_tokens: int  # KV columns the rows hold
    kv_capacity: int  # KV columns in the pool
    steps: int  # forwards since start
    step_seconds: float  # recent average duration of one step
    step_tokens: float  # recent average inputs computed per step


class Engine:
    """`submit` from any thread, `generate` from asyncio; `start` runs the loop on its own thread."""

    def __init__(
        self,
        backbone: Backbone,
        settings: EngineSettings | None = None,
        residency: Residency | None = None,
        *,
        resolve: Resolve | None = None,
    ):
        """`resolve(task_id, version)`: the version a request runs on, the current one when `version` is None (the
        task layer's `TaskService.key`); without one, the residency's store is asked each time."""
        self.backbone = backbone
        self.settings = settings = settings or EngineSettings()
        self.residency = residency or Residency(backbone)
        self.resolve: Resolve = resolve or self._current_in_store
        g = backbone.geometry
        self.pool = KVPool(
            layers=g.num_layers,
            kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            tokens=settings.max_kv_tokens,
            block_size=settings.kv_block_size,
            device=backbone.device,
            dtype=backbone.dtype,
        )
        self.limits = SchedulerLimits(
            max_rows=settings.max_batch_size,
            max_step_tokens=settings.max_step_tokens,
            kv_blocks=self.pool.capacity_blocks,
            block_size=self.pool.block_size,
        )
        self.runner = ModelRunner(backbone, self.residency.pool)
        self.grammars = Grammars(backbone.tokenizer, g.vocab_size, backbone.eos_token_ids)  # structured outputs
        self.batch = Batch(self.pool, self.residency.pool, lora_backend=settings.lora_backend)
        self.waiting = WaitingQueue(settings.max_queue)
        self.steps = 0
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._timing = (0.0, 0.0)  # exponential averages: seconds and inputs per step

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
        for row in list(self.batch.rows):
            self._finish(row, "error", error="the engine stopped")
        for row in self.waiting.drain():
            row.lease.release()
            row.end("error", error="the engine stopped")

    def run_until_idle(self) -> None:
        """Step on the caller's thread until nothing runs or waits (tests and tools; not with start())."""
        while self.batch.rows or self.waiting:
            self.step()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> list[Generation]:
        return self.batch.rows

    def stats(self) -> EngineStats:
        seconds, tokens = self._timing
        return EngineStats(
            running=len(self.batch.rows),
            waiting=len(self.waiting),
            kv_tokens=self.batch.kv_tokens,
            kv_capacity=self.pool.capacity_blocks * self.pool.block_size,
            steps=self.steps,
            step_seconds=seconds,
            step_tokens=tokens,
        )

    # --- requests ---------------------------------------------------------------------------------

    def submit(
        self, request: GenerationRequest, sink: Sink, lease: Lease | None = None, choices: Sequence[Sink] = ()
    ) -> Generation:
        """Queue a request; bad input or a full queue raise here and leave the running batch alone.

        `sink` receives token ids (no text) on the engine thread. `lease` pins the task's adapter (see
        `Residency.acquire_async`); without one, the adapter is acquired here, waiting for a load. A request for
        n > 1 choices gives a sink for each of the others in `choices`: their rows fork from this one.
        """
        if self._stopping.is_set():
            raise EngineStopped("the engine has stopped")
        n = request.sampling.n
        if len(choices) != n - 1:
            raise ValueError(f"n={n} choices need {n - 1} more sinks, got {len(choices)}")
        self._check_ids(request)
        lease = lease or self.residency.acquire(self.resolve(request.task_id, request.version))
        leases = shared_leases(lease, n) if n > 1 else [lease]
        try:
            row = self._row(request, leases[0], sink)
            row.children = [self._row(_choice(request, i), leases[i], choices[i - 1]) for i in range(1, n)]
            self._validate(row)
            self.waiting.push(row)
        except BaseException:
            for held in leases:
                held.release()
            raise
        self._wakeup.set()
        return row

    async def lease(self, task_id: str, version: int | None = None) -> Lease:
        """Pin the task's current version (or the one named) for one request: resolved and loaded off the event
        loop."""
        key = await asyncio.to_thread(self.resolve, task_id, version)
        return await self.residency.acquire_async(key)

    def _current_in_store(self, task_id: str, version: int | None = None) -> AdapterKey | None:
        if task_id == BASE_TASK:
            return None
        try:
            return AdapterKey(task_id, version or self.residency.store.info(task_id).current)
        except TaskNotFound:
            raise UnknownTask(f"unknown task {task_id!r}") from None

    def _row(self, request: GenerationRequest, lease: Lease, sink: Sink) -> Generation:
        """One row; a constrained one gets a matcher of its own (each of n choices walks its grammar alone)."""
        vocab, device = self.backbone.geometry.vocab_size, self.backbone.device
        constraint = request.sampling.constraint
        matcher = None if constraint is None else self.grammars.matcher(constraint)
        return Generation(request, lease, sink, self.backbone.eos_token_ids, device, vocab=vocab, matcher=matcher)

    def generate(self, request: GenerationRequest, lease: Lease | None = None) -> AsyncIterator[TokenDelta]:
        """Submit now (bad input and a full queue raise here), then stream text deltas in asyncio.

        Leaving the iteration early, or the task being cancelled, cancels the row.
        """
        if request.sampling.n != 1:
            raise ValueError("generate streams one choice: use generate_choices for n > 1")
        return self.generate_choices(request, lease)[0]

    def generate_choices(
        self, request: GenerationRequest, lease: Lease | None = None
    ) -> list[AsyncIterator[TokenDelta]]:
        """`generate` for each of the request's n choices, in order: one stream each, closed independently."""
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[TokenDelta]] = [asyncio.Queue() for _ in range(request.sampling.n)]
        rows: list[Generation] = []

        def sink_for(i: int) -> Sink:
            def sink(delta: TokenDelta) -> None:
                try:
                    loop.call_soon_threadsafe(queues[i].put_nowait, delta)
                except RuntimeError:  # the event loop is gone: nobody reads this row any more
                    rows[i].cancel()

            return sink

        row = self.submit(request, sink_for(0), lease, choices=[sink_for(i) for i in range(1, len(queues))])
        rows += [row, *row.children]
        streams = []
        for deltas, choice in zip(queues, rows):
            stream = _text_stream(deltas, choice, self._detokenizer(request))
            weakref.finalize(stream, choice.cancel)  # a stream dropped before its first read never runs its finally
            streams.append(stream)
        return streams

    def complete(self, request: GenerationRequest, timeout: float | None = None) -> TokenDelta:
        """Blocking convenience: run one request to the end and return its whole output as one delta."""
        deltas: queue.Queue[TokenDelta] = queue.Queue()
        row = self.submit(request, deltas.put)
        try:
            parts = list(_with_text(iter(lambda: deltas.get(timeout=timeout), None), row, self._detokenizer(request)))
        finally:
            row.cancel()
        last = parts[-1]
        return replace(
            last,
            token_ids=[t for d in parts for t in d.token_ids],
            text="".join(d.text for d in parts),
            logprobs=None if request.sampling.logprobs is None else [lp for d in parts for lp in d.logprobs or ()],
            prompt_logprobs=parts[0].prompt_logprobs,
            prompt_ids=parts[0].prompt_ids,
        )

    def _detokenizer(self, request: GenerationRequest) -> IncrementalDetokenizer | None:
        tokenizer, sampling = self.backbone.tokenizer, request.sampling
        if tokenizer is None:
            return None
        return IncrementalDetokenizer(
            tokenizer,
            request.prompt_ids,
            sampling.stop,
            skip_special_tokens=sampling.skip_special_tokens,
            include_stop=sampling.include_stop_str_in_output,
        )

    def _check_ids(self, request: GenerationRequest) -> None:
        """Every token id the request names lies in the vocabulary (checked before any tensor is indexed by one)."""
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab, sampling = self.backbone.geometry.vocab_size, request.sampling
        for name, ids in (
            ("prompt", request.prompt_ids),
            ("stop_token_ids", sampling.stop_token_ids),
            ("logit_bias", (t for t, _ in sampling.logit_bias)),
        ):
            if not all(0 <= t < vocab for t in ids):
                raise InvalidRequest(f"{name}: token ids must lie in [0, {vocab})", param=name)

    def _validate(self, row: Generation) -> None:
        sampling, limit = row.sampling, self.backbone.geometry.context_length
        n, most = sampling.n, min(self.settings.max_n, self.settings.max_batch_size)
        if n > most:
            raise InvalidRequest(f"n={n} exceeds this server's limit of {most} choices per prompt", param="n")
        asked, allowed = sampling.max_new_tokens, self.settings.max_new_tokens
        if asked > allowed:
            raise InvalidRequest(f"max_new_tokens={asked} exceeds this server's limit of {allowed}", "max_new_tokens")
        columns = row.prefix_len + row.kv_tokens
        if columns > limit:
            virtual = row.prefix_len + row.soft_len
            raise InvalidRequest(
                f"prompt ({len(row.prompt_ids)} tokens + {virtual} virtual) + max_new_tokens ({asked}) "
                f"exceeds the context length of {limit}",
                param="max_new_tokens",
                code="context_length_exceeded",
            )
        if reserved_blocks(row, self.pool.block_size) > self.pool.capacity_blocks:
            raise InvalidRequest(
                f"this request needs {columns} KV columns; the server holds {self.settings.max_kv_tokens}",
                param="max_new_tokens",
            )
        if sampling.stop and self.backbone.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer, and this backbone has none", param="stop")
        _check_adapter_scale(row)

    # --- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self.batch.rows and not self.waiting:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # a fault outside any row's forward: keep serving
                log.exception("engine step failed")

    @torch.inference_mode()
    def step(self) -> None:
        """Schedule, execute, update."""
        for row in [r for r in self.batch.rows if r.cancelled]:
            self._finish(row, "cancelled")
        plan = schedule(self.waiting.order(), self.batch.rows, self.limits)
        failed = self._admit(plan)
        if failed:
            plan = plan.only([row for row, _ in plan.chunks if row not in failed])
        if not plan.chunks:
            return
        started = time.perf_counter()
        done, output = self._execute(plan)
        self._update(done, output)
        self.steps += 1
        seconds, tokens = self._timing
        elapsed = time.perf_counter() - started
        self._timing = (
            (0.9 * seconds + 0.1 * elapsed, 0.9 * tokens + 0.1 * plan.tokens)
            if self.steps > 1
            else (elapsed, plan.tokens)
        )

    def _admit(self, plan: StepPlan) -> list[Generation]:
        """Move the plan's admitted rows from the queue into the batch; returns the ones that failed to join."""
        self.waiting.remove(list(plan.admitted), admitted=True)
        self.waiting.remove(list(plan.skipped), admitted=False)
        for row in plan.skipped:
            row.lease.release()
            row.end("cancelled")
        failed = []
        now = time.monotonic()
        for row in plan.admitted:
            row.queue_seconds = now - row.submitted
            adapter = row.adapter
            try:
                if adapter is not None and adapter.needs_template_kv:
                    # a template's leading tokens: prefilled once, here on the engine thread, then shared
                    adapter.prefix_kv = self.runner.prefix_kv(adapter.template_ids)
                self.batch.add(row)
            except Exception as exc:
                log.exception("a row failed to join the batch (task %s)", row.request.task_id)
                self._finish(row, "error", error=f"{type(exc).__name__}: {exc}")
                failed.append(row)
        return failed

    def _execute(self, plan: StepPlan) -> tuple[list[tuple[Generation, int]], RunnerOutput]:
        """Run the plan; a fault is narrowed down by halves to the rows it comes from, which end alone.

        Re-running part of a step is safe: it rewrites the same KV slots with the same values.
        """
        try:
            return list(plan.chunks), self.runner.execute(plan, self.batch)
        except Exception as exc:
            if len(plan.chunks) == 1:
                row = plan.chunks[0][0]
                log.exception("a step failed for one row (task %s); ending that row", row.request.task_id)
                self._finish(row, "error", error=f"{type(exc).__name__}: {exc}")
                return [], RunnerOutput(rows=(), tokens=(), logprobs=())
            half = len(plan.chunks) // 2
            parts = [
                self._execute(plan.only([r for r, _ in chunks])) for chunks in (plan.chunks[:half], plan.chunks[half:])
            ]
            done = [c for d, _ in parts for c in d]
            return done, RunnerOutput(
                rows=tuple(r for _, o in parts for r in o.rows),
                tokens=tuple(t for _, o in parts for t in o.tokens),
                logprobs=tuple(lp for _, o in parts for lp in o.logprobs),
                prompt_logprobs=tuple(lp for _, o in parts for lp in o.prompt_logprobs),
            )

    def _update(self, done: Iterable[tuple[Generation, int]], output: RunnerOutput) -> None:
        for row, n in done:
            row.computed += n
        for row, scored in output.prompt_logprobs:
            row.prompt_logprobs += scored
        self.waiting.charge(Counter(row.request.task_id for row in output.rows))
        for row, token, logprob in zip(output.rows, output.tokens, output.logprobs):
            if row.children:  # its prompt is computed: its other choices fork from it now
                self._fork(row)
            delta = row.accept(token, logprob)
            if delta.finish_reason is not None:
                self._finish(row, delta.finish_reason, delta=delta)
            else:
                self._emit(row, delta)

    def _fork(self, row: Generation) -> None:
        gone = [child for child in row.children if child.cancelled]
        row.children = [child for child in row.children if not child.cancelled]
        for child in gone:
            child.lease.release()
            child.end("cancelled")
        self.batch.fork(row)

    def _finish(self, row: Generation, reason, error: str | None = None, delta: TokenDelta | None = None) -> None:
        """Drop a row from the batch, release its task, close its stream."""
        if row in self.batch.rows:
            self.batch.drop(row)
            task = row.request.task_id
            if all(r.request.task_id != task for r in self.batch.rows):
                self.waiting.forget(task)
        row.lease.release()
        if delta is not None:
            self._emit(row, delta)
        else:
            try:
                row.end(reason, error)
            except Exception:
                log.exception("a sink failed")

    def _emit(self, row: Generation, delta: TokenDelta) -> None:
        try:
            row.sink(delta)
        except Exception:  # one reader's fault is its own: the row ends, the batch goes on
            log.exception("a sink failed; cancelling its row")
            row.cancel()


def _check_adapter_scale(row: Generation) -> None:
    """adapter_scale weights per-layer weights (LoRA family, IA³); a task without any has nothing it could scale."""
    scale, adapter = row.adapter_scale, row.adapter
    if not (isinstance(scale, int | float) and 0 <= scale <= MAX_ADAPTER_SCALE):
        raise InvalidRequest(f"adapter_scale={scale!r} is outside [0, {MAX_ADAPTER_SCALE:g}]", param="adapter_scale")
    if scale != 1.0 and (adapter is None or not adapter.layer_weights):
        what = "the backbone" if adapter is None else f"a {adapter.kind} task"
        raise InvalidRequest(
            f"adapter_scale={scale:g}: {what} has no per-layer adapter weights (LoRA family, IA³) to scale; "
            "omit adapter_scale or send 1",
            param="adapter_scale",
        )


def _choice(request: GenerationRequest, i: int) -> GenerationRequest:
    """The i-th of a request's n choices: one row, its own seed (seed + i) so that choices differ."""
    seed = request.sampling.seed
    sampling = replace(request.sampling, n=1, seed=None if seed is None else (seed + i) % SEED_LIMIT)
    return replace(request, sampling=sampling, request_id=f"{request.request_id}-{i}")


def _with_text(
    deltas: Iterator[TokenDelta], row: Generation, detokenizer: IncrementalDetokenizer | None
) -> Iterator[TokenDelta]:
    """Token deltas with their text; a stop string ends the stream (and cancels the row). The token that ends a
    row (EOS, a stop token) shows no text unless the request includes what stopped it."""
    for delta in deltas:
        if detokenizer is None:
            yield delta
        else:
            shown = delta.token_ids
            ended_by_token = delta.finish_reason == "stop" and bool(shown) and shown[-1] in row.end_ids
            if ended_by_token and not detokenizer.include_stop:
                shown = shown[:-1]  # EOS or a stop token; a grammar that completes ends on a token of its output
            text = "".join(detokenizer.push(t) for t in shown)
            reason = "stop" if detokenizer.stopped else delta.finish_reason
            if reason is not None:
                text += detokenizer.finish()
            yield replace(delta, text=text, finish_reason=reason)
            if detokenizer.stopped:
                row.cancel()
                return
        if delta.finish_reason is not None:
            return


async def _text_stream(
    deltas: asyncio.Queue[TokenDelta], row: Generation, detokenizer: IncrementalDetokenizer | None
) -> AsyncIterator[TokenDelta]:
    async def raw() -> AsyncIterator[TokenDelta]:
        while True:
            yield await deltas.get()

    try:
        async for delta in raw():
            for out in _with_text(iter((delta,)), row, detokenizer):
                yield out
                if out.finish_reason is not None:
                    return
    finally:
        row.cancel()
