"""A Batch owns its tensors: KV cache, attention mask, positions, last tokens, per-row adapters.

It knows how to prefill itself from new rows, run one decode step, drop
finished rows (`filter`) and merge with another batch (`concatenate`). The
scheduler never touches a KV layout or padding.

Layout: rows are left-padded. Prefill writes each row's prefix-tuning KV
right-aligned in the first `P` columns (raw, no RoPE), then the row's soft
prompt and tokens right-aligned in the next `Q`. Positions are per row and
pad-independent: a row's tokens sit at `prefix_len + soft_len + i`, exactly
what single-request PEFT uses (PEFT-SEMANTICS §2.3, §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from server.engine.adapters.base import LoadedAdapter
from server.engine.adapters.batched import AdapterBatchData
from server.engine.kv_cache import HEADROOM, KVCache
from server.engine.runner import ModelRunner


class Row(Protocol):
    """What a batch needs to know of a row; the scheduler's live request state provides it."""

    prompt_ids: Sequence[int]
    adapter: LoadedAdapter | None


@dataclass(frozen=True)
class PrefillShape:
    """Column counts of a prefill: prefix KV first, then soft prompt + tokens."""

    prefix: int  # P: longest prefix-tuning KV among the rows
    query: int  # Q: longest soft prompt + prompt among the rows

    @classmethod
    def of(cls, rows: Sequence[Row]) -> PrefillShape:
        return cls(
            prefix=max(_prefix_len(r) for r in rows),
            query=max(_soft_len(r) + len(r.prompt_ids) for r in rows),
        )


def _prefix_len(row: Row) -> int:
    return 0 if row.adapter is None else row.adapter.prefix_len


def _soft_len(row: Row) -> int:
    return 0 if row.adapter is None else row.adapter.soft_len


def kv_columns(row: Row) -> int:
    """KV columns a row occupies right after its prefill."""
    return _prefix_len(row) + _soft_len(row) + len(row.prompt_ids)


class Batch:
    def __init__(
        self,
        rows: list[Row],
        kv: KVCache,
        attention_mask: torch.Tensor,
        next_positions: torch.Tensor,
        next_tokens: torch.Tensor | None = None,
    ):
        self.rows = rows
        self.kv = kv  # per layer [batch, kv_heads, capacity, head_dim]
        self.attention_mask = attention_mask  # [batch, capacity] long; 1 where a column holds this row's KV
        self.next_positions = next_positions  # [batch] long: position of the next token each row feeds
        self.next_tokens = next_tokens  # [batch] long: the token each row feeds next (None before sampling)
        self._adapter_data: AdapterBatchData | None | bool = False  # False: not built yet

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """KV columns in use (the longest row, with its left padding)."""
        return self.kv.length

    @property
    def adapter_data(self) -> AdapterBatchData | None:
        """Per-step adapter tensors, built once per composition (filter/concatenate make a new Batch)."""
        if self._adapter_data is False:
            device = self.attention_mask.device
            self._adapter_data = AdapterBatchData.build([r.adapter for r in self.rows], device)
        return self._adapter_data

    # --- building ------------------------------------------------------------------------------

    @classmethod
    def prefill(cls, rows: list[Row], runner: ModelRunner) -> tuple[Batch, torch.Tensor]:
        """Run the rows' prompts; returns the batch and the logits of each row's last token, [batch, vocab]."""
        shape = PrefillShape.of(rows)
        width = shape.prefix + shape.query
        batch_size, device = len(rows), runner.device
        kv = runner.empty_cache(batch=batch_size, capacity=width + HEADROOM)
        mask = torch.zeros(batch_size, width + HEADROOM, dtype=torch.long, device=device)
        ids = torch.zeros(batch_size, shape.query, dtype=torch.long, device=device)
        positions = torch.zeros(batch_size, shape.query, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            prefix, soft, n = _prefix_len(row), _soft_len(row), len(row.prompt_ids)
            if prefix:
                for layer, cache in enumerate(kv.layers):
                    cache.keys[i, :, shape.prefix - prefix : shape.prefix] = row.adapter.prefix_kv[layer, 0]
                    cache.values[i, :, shape.prefix - prefix : shape.prefix] = row.adapter.prefix_kv[layer, 1]
                mask[i, shape.prefix - prefix : shape.prefix] = 1
            mask[i, width - soft - n : width] = 1
            ids[i, shape.query - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            positions[i, shape.query - soft - n :] = torch.arange(prefix, prefix + soft + n)
        kv.set_length(shape.prefix)
        embeds = runner.embed(ids)  # [batch, query, hidden]
        for i, row in enumerate(rows):
            if soft := _soft_len(row):
                start = shape.query - soft - len(row.prompt_ids)
                embeds[i, start : start + soft] = row.adapter.soft_prompt.to(embeds.dtype)
        batch = cls(rows, kv, mask, next_positions=positions[:, -1] + 1)
        logits = runner.forward(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=mask[:, :width],
            cache=kv,
            adapters=batch.adapter_data,
        )
        return batch, logits

    def decode(self, runner: ModelRunner) -> torch.Tensor:
        """Feed every row's `next_tokens`; returns logits [batch, vocab]."""
        end = self.length + 1
        if end > self.attention_mask.shape[1]:
            grown = self.attention_mask.new_zeros(len(self), end + HEADROOM)
            grown[:, : self.attention_mask.shape[1]] = self.attention_mask
            self.attention_mask = grown
        self.attention_mask[:, self.length] = 1
        logits = runner.forward(
            input_ids=self.next_tokens[:, None],
            position_ids=self.next_positions[:, None],
            attention_mask=self.attention_mask[:, :end],
            cache=self.kv,
            adapters=self.adapter_data,
        )
        self.next_positions = self.next_positions + 1
        return logits

    # --- reshaping -------------------------------------------------------------------------------

    def filter(self, keep: Sequence[int]) -> Batch:
        """A batch of rows `keep` (indices into this batch), with leading all-padding columns dropped."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)[:, : self.length]
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.length
        kv = self.kv.select(index, start)
        new_mask = mask.new_zeros(len(keep), kv.capacity)
        new_mask[:, : self.length - start] = mask[:, start:]
        batch = Batch(
            rows=[self.rows[i] for i in keep],
            kv=kv,
            attention_mask=new_mask,
            next_positions=self.next_positions.index_select(0, index),
            next_tokens=None if self.next_tokens is None else self.next_tokens.index_select(0, index),
        )
        if self._adapter_data is not False:  # derive the rows' adapter data instead of rebuilding it
            data = self._adapter_data
            batch._adapter_data = None if data is None else data.select(keep, len(self))
        return batch

    @classmethod
    def concatenate(cls, batches: Sequence[Batch]) -> Batch:
        """One batch holding all rows; shorter batches are left-padded to the longest."""
        batches = [b for b in batches if len(b)]
        if len(batches) == 1:
            return batches[0]
        kv = KVCache.stack([b.kv for b in batches])
        length = kv.length
        mask = batches[0].attention_mask.new_zeros(sum(len(b) for b in batches), kv.capacity)
        row = 0
        for b in batches:
            mask[row : row + len(b), length - b.length : length] = b.attention_mask[:, : b.length]
            row += len(b)
        return cls(
            rows=[r for b in batches for r in b.rows],
            kv=kv,
            attention_mask=mask,
            next_positions=torch.cat([b.next_positions for b in batches]),
            next_tokens=torch.cat([b.next_tokens for b in batches]),
        )
