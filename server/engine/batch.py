"""The running batch: its rows, the KV blocks they hold, and each step's packed inputs.

Rows join and leave without touching anyone else's KV (it lives in the shared `KVPool`, in each
row's own blocks). A step packs the rows' new inputs into one sequence — a chunk of a prompt for a
prefilling row, one token for a decoding row — with no padding, each at its own positions, rows of
one adapter side by side so a LoRA applies to contiguous runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.adapters.batched import AdapterStep, LoraBackendName
from server.engine.adapters.pool import AdapterPool
from server.engine.attention import AttentionPlan
from server.engine.generation import Generation
from server.engine.kv_cache import KVPool

Chunk = tuple[Generation, int]  # a row and how many of its inputs it computes this step


@dataclass(frozen=True)
class StepInputs:
    """Everything one forward reads, for rows packed in `rows` order."""

    rows: tuple[Chunk, ...]
    token_ids: torch.Tensor  # [tokens] long; 0 where the input is a soft-prompt vector
    positions: torch.Tensor  # [tokens] long
    soft_index: torch.Tensor | None  # [k] long: packed inputs that are soft-prompt vectors
    soft_embeds: torch.Tensor | None  # [k, hidden]: those vectors
    attention: AttentionPlan
    adapters: AdapterStep | None
    sampled: tuple[Generation, ...]  # rows whose last pending input is computed this step: they sample
    sample_index: torch.Tensor  # [sampled] long: the packed input whose logits each samples from
    # prompt log-probabilities, for rows that asked: the packed inputs that predict a prompt token, and those tokens
    scored: tuple[Chunk, ...] = ()  # (row, how many of its prompt tokens are scored this step), in packed order
    score_index: torch.Tensor | None = None  # [scored tokens] long
    score_targets: torch.Tensor | None = None  # [scored tokens] long: the prompt token each input predicts


class Batch:
    """The rows that hold KV; `prepare` turns a step's chunks into `StepInputs`."""

    def __init__(self, pool: KVPool, adapter_pool: AdapterPool, lora_backend: LoraBackendName = "auto"):
        self.pool = pool
        self.adapter_pool = adapter_pool
        self.lora_backend = lora_backend
        self.rows: list[Generation] = []
        self._adapters: AdapterStep | None = None  # the last step's: lends its gathered LoRA weights to the next

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Generation) -> None:
        """Join: the row's prefix KV (shared with its task's other rows) heads its slots."""
        adapter = row.adapter
        if adapter is not None and adapter.prefix_kv is not None:
            row.kv_slots = self.pool.acquire_prefix(adapter.key, adapter.prefix_kv)
        else:
            row.kv_slots = torch.empty(0, dtype=torch.long, device=self.pool.device)
        self.rows.append(row)

    def fork(self, parent: Generation) -> list[Generation]:
        """Join `parent`'s choices, now that its prompt is computed, sharing its prompt's KV: the blocks holding
        all but its last input go to a shared entry that each choice reads from; each recomputes that last input
        into blocks of its own (one input, so it has logits to sample from) and generates from there."""
        children, parent.children = parent.children, []
        if not children:
            return []
        borrowed = parent.prompt_inputs - 1  # inputs the children read from the parent
        shared_blocks = self.pool.blocks_for(borrowed)
        key = f"fork:{parent.request.request_id}"
        self.pool.share(key, parent.blocks[:shared_blocks], users=1 + len(children))
        parent.blocks = parent.blocks[shared_blocks:]
        parent.shared_inputs, parent.fork_key = shared_blocks * self.pool.block_size, key
        head = parent.kv_slots[: parent.prefix_len + borrowed]  # [prefix + borrowed]: adapter prefix, then prompt
        for child in children:
            if child.adapter is not None and child.adapter.prefix_kv is not None:
                self.pool.acquire_prefix(child.adapter.key, child.adapter.prefix_kv)  # one more user of it
            child.kv_slots = head.clone()
            child.borrowed = child.shared_inputs = child.computed = borrowed
            child.prompt_logprobs = list(parent.prompt_logprobs)
            child.fork_key = key
            self.rows.append(child)
        return children

    def drop(self, row: Generation) -> None:
        """Leave: the row's blocks go back to the pool, and its hold on what it shares."""
        self.rows.remove(row)
        if not self.rows:
            self._adapters = None  # nothing runs: nothing to keep gathered
        self.pool.free(row.blocks)
        row.blocks = []
        if row.adapter is not None and row.adapter.prefix_kv is not None:
            self.pool.release_prefix(row.adapter.key)
        if row.fork_key is not None:
            self.pool.release_prefix(row.fork_key)
            row.fork_key = None
        row.kv_slots = None

    @property
    def kv_tokens(self) -> int:
        """KV columns the rows hold (their blocks, whole; shared prefixes once)."""
        return (self.pool.capacity_blocks - self.pool.free_blocks) * self.pool.block_size

    def prepare(self, chunks: Sequence[Chunk]) -> StepInputs:
        """The packed inputs of `chunks`, after giving each row the KV blocks its new inputs need."""
        device = self.pool.device
        rows = sorted(chunks, key=_adapter_order)  # adapters side by side
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[torch.Tensor] = []
        soft_index: list[int] = []
        soft_parts: list[torch.Tensor] = []
        decode_rows: list[tuple[int, torch.Tensor]] = []
        prefill_rows: list[tuple[int, int, torch.Tensor]] = []
        sampled: list[Generation] = []
        sample_index: list[int] = []
        scored: list[Chunk] = []
        score_index: list[int] = []
        score_targets: list[int] = []
        for row, n in rows:
            start, first = len(ids), row.computed
            self._reserve(row, first + n)
            prefix = row.prefix_len
            ids += row.input_ids(first, first + n)
            positions += range(prefix + first, prefix + first + n)
            slot_parts.append(row.kv_slots[prefix + first : prefix + first + n])
            soft_end = min(first + n, row.soft_len)
            if first < soft_end:  # soft-prompt vectors among this chunk's inputs
                soft_index += range(start, start + soft_end - first)
                soft_parts.append(row.adapter.soft_prompt[first:soft_end])
            visible = row.kv_slots[: prefix + first + n]
            if n == 1:
                decode_rows.append((start, visible))
            else:
                prefill_rows.append((start, start + n, visible))
            if first + n == row.inputs:
                sampled.append(row)
                sample_index.append(start + n - 1)
            if row.sampling.prompt_logprobs is not None:
                # input i predicts input i + 1: the prompt's inputs before its last predict its tokens after the first
                lo, hi = max(first, row.soft_len), min(first + n, row.prompt_inputs - 1)
                if lo < hi:
                    scored.append((row, hi - lo))
                    score_index += range(start + lo - first, start + hi - first)
                    score_targets += row.prompt_ids[lo + 1 - row.soft_len : hi + 1 - row.soft_len]
        slot_mapping = torch.cat(slot_parts)
        spans = [(r.adapter, n, r.adapter_scale) for r, n in rows]
        self._adapters = AdapterStep.build(spans, self.adapter_pool, self.lora_backend, previous=self._adapters)
        return StepInputs(
            rows=tuple(rows),
            token_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            soft_index=torch.tensor(soft_index, device=device) if soft_index else None,
            soft_embeds=torch.cat(soft_parts) if soft_parts else None,
            attention=AttentionPlan.build(self.pool, slot_mapping, decode_rows, prefill_rows),
            adapters=self._adapters,
            sampled=tuple(sampled),
            sample_index=torch.tensor(sample_index, dtype=torch.long, device=device),
            scored=tuple(scored),
            score_index=torch.tensor(score_index, dtype=torch.long, device=device) if scored else None,
            score_targets=torch.tensor(score_targets, dtype=torch.long, device=device) if scored else None,
        )

    def _reserve(self, row: Generation, inputs: int) -> None:
        """Enough own blocks for `inputs` computed inputs (past those whose slots lie in shared blocks)."""
        missing = self.pool.blocks_for(inputs - row.shared_inputs) - len(row.blocks)
        if missing > 0:
            blocks, slots = self.pool.allocate(missing)
            row.blocks += blocks
            row.kv_slots = torch.cat([row.kv_slots, slots])


def _adapter_order(chunk: Chunk) -> tuple[str, int]:
    adapter = chunk[0].adapter
    return ("", 0) if adapter is None else (adapter.key.task_id, adapter.key.version)
