"""Admission and the per-step token budget: a pure function from the engine's state to a plan.

No phases: every step, each decoding row computes its one new token (running rows never wait),
rows part-way through their prompt continue with a chunk, and waiting requests are admitted in
order (fair across tasks, see waiting.py) while the row limit, the step's token budget and the KV
reservations allow, each with a first chunk. A long prompt therefore prefills over several steps
alongside the decoding rows.

A row reserves the KV it may hold at its longest (prompt, soft prompt, prefix and every token it
may generate) when admitted, so a running row never runs out of KV; the blocks themselves are
only taken as the row writes them. A request for n choices is admitted as n rows: the rows it
forks once its prompt is computed are reserved with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Schedulable(Protocol):
    """What the scheduler reads of a row or a waiting request."""

    @property
    def pending(self) -> int: ...  # inputs still to compute before the next sample

    @property
    def prefilling(self) -> bool: ...

    @property
    def kv_tokens(self) -> int: ...  # own KV columns at its longest

    @property
    def prefix_len(self) -> int: ...  # shared prefix KV columns

    @property
    def forks(self) -> int: ...  # rows to fork from it when its prompt is computed (n > 1)

    @property
    def fork_kv_tokens(self) -> int: ...  # own KV columns each of those may hold at its longest

    cancelled: bool


@dataclass(frozen=True)
class SchedulerLimits:
    max_rows: int  # rows in the running batch
    max_step_tokens: int  # inputs computed in one forward, decoding rows' tokens first
    kv_blocks: int  # KV blocks in the pool
    block_size: int  # KV columns a block holds


@dataclass(frozen=True)
class StepPlan:
    """One engine step. Token counts are inputs (soft-prompt vectors included), not KV columns."""

    admitted: tuple = ()  # waiting requests that join the batch now, in order
    chunks: tuple = ()  # (row, inputs to compute) for every row computing this step, admitted rows included
    reserved_blocks: int = 0  # KV blocks the batch has reserved after admission
    skipped: tuple = field(default=())  # cancelled waiting requests seen, to be dropped

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def only(self, rows: Sequence) -> StepPlan:
        """This plan restricted to `rows` (to re-run part of a failed step)."""
        keep = {id(r) for r in rows}
        return StepPlan(admitted=(), chunks=tuple(c for c in self.chunks if id(c[0]) in keep))


def reserved_blocks(row: Schedulable, block_size: int) -> int:
    """KV blocks a row reserves: its own columns at their longest, plus its prefix; and as much for each row it
    will fork, so that forking never takes more than was reserved."""
    prefix = math.ceil(row.prefix_len / block_size)
    return (
        math.ceil(row.kv_tokens / block_size)
        + prefix
        + row.forks * (math.ceil(row.fork_kv_tokens / block_size) + prefix)
    )


def schedule(waiting: Iterable[Schedulable], running: Sequence[Schedulable], limits: SchedulerLimits) -> StepPlan:
    """The next step: decode every decoding row, continue prefills, admit what fits. Changes nothing.

    `waiting` is read in admission order (fair across tasks: `WaitingQueue.order`) and only as far as needed.
    """
    budget = limits.max_step_tokens
    chunks = []
    for row in running:
        if not row.cancelled and not row.prefilling:
            chunks.append((row, 1))
            budget -= 1
    for row in running:
        if not row.cancelled and row.prefilling and budget > 0:
            n = min(row.pending, budget)
            chunks.append((row, n))
            budget -= n
    reserved = sum(reserved_blocks(row, limits.block_size) for row in running)
    rows = len(running)
    admitted, skipped = [], []
    for request in waiting:
        if request.cancelled:
            skipped.append(request)
            continue
        need = reserved_blocks(request, limits.block_size)
        if budget <= 0 or rows + 1 + request.forks > limits.max_rows or reserved + need > limits.kv_blocks:
            break  # in order: a request that does not fit holds the ones behind it back
        n = min(request.pending, budget)
        admitted.append(request)
        chunks.append((request, n))
        budget -= n
        reserved += need
        rows += 1 + request.forks
    return StepPlan(admitted=tuple(admitted), chunks=tuple(chunks), reserved_blocks=reserved, skipped=tuple(skipped))
