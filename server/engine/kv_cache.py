"""A KV cache the batch owns: preallocated per-layer buffers written in place.

transformers' `DynamicCache` concatenates on every step, copying the whole
cache; these buffers grow by a fixed headroom instead, so a decode step writes
one column. Rows are left-padded: a row's tokens end at `length`, and the
batch's attention mask says which columns hold something.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

HEADROOM = 64  # columns allocated past the current need; a regrow copies once per this many steps


class KVLayer(CacheLayerMixin):
    """One layer's keys and values: `[batch, kv_heads, capacity, head_dim]`, valid up to `length`."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [batch, kv_heads, new, head_dim], already rotated by the model
        new = key_states.shape[2]
        end = self.length + new
        if end > self.keys.shape[2]:
            self.keys, self.values = (_regrow(t, end + HEADROOM) for t in (self.keys, self.values))
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


def _regrow(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    grown = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[3])
    grown[:, :, : buffer.shape[2]] = buffer
    return grown


class KVCache(Cache):
    """All layers of a batch's cache; every layer has the same length."""

    layers: list[KVLayer]

    def __init__(self, layers: list[KVLayer]):
        super().__init__(layers=layers)

    @classmethod
    def empty(cls, *, batch: int, capacity: int, layers: int, kv_heads: int, head_dim: int, device, dtype) -> KVCache:
        def buffer() -> torch.Tensor:
            return torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)

        return cls([KVLayer(buffer(), buffer(), length=0) for _ in range(layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def set_length(self, length: int) -> None:
        for layer in self.layers:
            layer.length = length

    def select(self, rows: torch.Tensor, start: int) -> KVCache:
        """Rows `rows`, columns `start:length`, copied into fresh buffers with headroom."""
        span = self.length - start
        out = []
        for layer in self.layers:
            keys, values = (
                _with_capacity(t.index_select(0, rows)[:, :, start : self.length], span + HEADROOM)
                for t in (layer.keys, layer.values)
            )
            out.append(KVLayer(keys, values, length=span))
        return KVCache(out)

    @classmethod
    def stack(cls, caches: Sequence[KVCache]) -> KVCache:
        """Concatenate rows, right-aligning each cache's columns to the longest one."""
        length = max(c.length for c in caches)
        out = []
        for i in range(len(caches[0].layers)):
            parts = [(c.layers[i].keys, c.layers[i].values, c.length) for c in caches]
            keys, values = (_right_aligned([(p[j], p[2]) for p in parts], length + HEADROOM, length) for j in (0, 1))
            out.append(KVLayer(keys, values, length=length))
        return cls(out)


def _with_capacity(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = t.new_zeros(*t.shape[:2], capacity, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


def _right_aligned(parts: list[tuple[torch.Tensor, int]], capacity: int, length: int) -> torch.Tensor:
    first = parts[0][0]
    rows = sum(t.shape[0] for t, _ in parts)
    out = first.new_zeros(rows, first.shape[1], capacity, first.shape[3])
    row = 0
    for t, used in parts:
        out[row : row + t.shape[0], :, length - used : length] = t[:, :, :used]
        row += t.shape[0]
    return out
