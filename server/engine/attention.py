"""Attention over the paged KV cache for one packed step, registered with transformers.

A step packs every row's new tokens into one sequence (batch 1, no padding): decoding rows bring
one token, prefilling rows a chunk. The model computes queries, keys and values as usual (RoPE
applied at each token's own position) and calls `paged_attention` instead of its own attention;
there the new keys and values are written into their slots, and each row attends to its own slots
only:

- decoding rows in a few groups of similar KV length: one SDPA call per group over the rows' slots
  gathered into `[rows, kv_heads, length, head_dim]`, the shorter rows masked past their end;
- each prefilling row on its own: its chunk against its cached slots plus the chunk, causally.

Called without a step plan (a plain `model(...)` call), it is transformers' SDPA attention, so the
backbone stays usable as an ordinary model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.kv_cache import KVPool

ATTENTION = "taskserve_paged"
PLAN_KWARG = "taskserve_step"

# A decode group is split where a row's KV is shorter than this fraction of the group's longest,
# so padding at most doubles a group's attention work; at most this many groups per step.
GROUP_SPLIT = 0.5
MAX_DECODE_GROUPS = 4


@dataclass(frozen=True)
class DecodeGroup:
    """Rows with one new token each, attending to KV of similar length."""

    queries: torch.Tensor | None  # [rows] long: packed index of each row's token; None: tokens 0..rows-1
    slots: torch.Tensor  # [rows, length] long: each row's KV slots, null-padded
    mask: torch.Tensor | None  # [rows, 1, 1, length] bool: a real column; None when no row is padded


@dataclass(frozen=True)
class PrefillSpan:
    """One row's chunk of new tokens: packed tokens `start:end` against `slots`, causally."""

    start: int
    end: int
    slots: torch.Tensor  # [cached + new] long: the row's KV slots through this chunk
    mask: torch.Tensor | None  # [1, 1, new, cached + new] bool; None for a chunk with nothing cached


@dataclass(frozen=True)
class AttentionPlan:
    """How one packed step reads and writes the KV pool; built once, used by every layer."""

    pool: KVPool
    slot_mapping: torch.Tensor  # [tokens] long: where each new token's key and value go
    decode: tuple[DecodeGroup, ...]
    prefill: tuple[PrefillSpan, ...]

    @classmethod
    def build(
        cls,
        pool: KVPool,
        slot_mapping: torch.Tensor,
        decode_rows: Sequence[tuple[int, torch.Tensor]],
        prefill_rows: Sequence[tuple[int, int, torch.Tensor]],
    ) -> AttentionPlan:
        """decode_rows: (packed token, the row's slots through it); prefill_rows: (start, end, slots)."""
        device = slot_mapping.device
        decode = []
        for group in length_groups([len(slots) for _, slots in decode_rows]):
            tokens = [decode_rows[i][0] for i in group]
            rows = [decode_rows[i][1] for i in group]
            lengths = torch.tensor([len(s) for s in rows], device=device)
            slots = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [rows, length], 0 = null slot
            ragged = bool((lengths < slots.shape[1]).any())
            mask = (torch.arange(slots.shape[1], device=device) < lengths[:, None])[:, None, None] if ragged else None
            in_order = tokens == list(range(len(tokens)))
            queries = None if in_order else torch.tensor(tokens, device=device)
            decode.append(DecodeGroup(queries=queries, slots=slots, mask=mask))
        prefill = []
        for start, end, slots in prefill_rows:
            new, total = end - start, len(slots)
            mask = None
            if total > new:
                cached = total - new
                visible = cached + 1 + torch.arange(new, device=device)  # query i sees columns < cached + i + 1
                mask = (torch.arange(total, device=device)[None, :] < visible[:, None])[None, None]
            prefill.append(PrefillSpan(start=start, end=end, slots=slots, mask=mask))
        return cls(pool=pool, slot_mapping=slot_mapping, decode=tuple(decode), prefill=tuple(prefill))


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length (longest first), for padded batched attention."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (lengths[i] >= GROUP_SPLIT * lengths[groups[-1][0]] or len(groups) == MAX_DECODE_GROUPS):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    value: torch.Tensor,  # [1, kv_heads, tokens, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Returns [1, tokens, heads, head_dim], like every transformers attention function."""
    plan: AttentionPlan | None = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer = module.layer_idx
    pool = plan.pool
    pool.write(layer, plan.slot_mapping, key[0].transpose(0, 1), value[0].transpose(0, 1))
    heads, kv_heads = query.shape[1], key.shape[1]
    group = heads // kv_heads
    out = query.new_empty(query.shape[2], heads, query.shape[3])  # [tokens, heads, head_dim]
    for decode in plan.decode:
        rows = decode.slots.shape[0]
        q = query[0].transpose(0, 1)  # [tokens, heads, head_dim]
        q = q[:rows] if decode.queries is None else q.index_select(0, decode.queries)
        keys, values = pool.gather(layer, decode.slots)  # [rows, length, kv_heads, head_dim]
        # the query heads sharing a KV head become that head's queries: no repeat of the KV (GQA)
        o = F.scaled_dot_product_attention(
            q.reshape(rows, kv_heads, group, -1),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=decode.mask,
            scale=scaling,
        )  # [rows, kv_heads, group, head_dim]
        o = o.reshape(rows, heads, -1)
        if decode.queries is None:
            out[:rows] = o
        else:
            out.index_copy_(0, decode.queries, o)
    for span in plan.prefill:
        keys, values = pool.gather(layer, span.slots)  # [length, kv_heads, head_dim]
        keys, values = (t.transpose(0, 1)[None] for t in (keys, values))  # [1, kv_heads, length, head_dim]
        o = F.scaled_dot_product_attention(
            query[:, :, span.start : span.end],
            keys.repeat_interleave(group, dim=1) if group > 1 else keys,
            values.repeat_interleave(group, dim=1) if group > 1 else values,
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=scaling,
        )  # [1, heads, new, head_dim]
        out[span.start : span.end] = o[0].transpose(0, 1)
    return out[None], None


def register() -> None:
    """Make `ATTENTION` a name transformers models accept as their attention implementation."""
    AttentionInterface.register(ATTENTION, paged_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # plain calls get SDPA's masks
