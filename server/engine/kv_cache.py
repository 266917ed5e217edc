"""The paged KV cache: one pool of key/value slots that every running row draws from.

Each layer's keys and values live in `[slots, kv_heads, head_dim]` buffers allocated once. A row
owns blocks of `block_size` slots, taken as it grows and returned when it ends, so its KV costs
what it holds and admitting a row copies nobody else's KV. A prefix several rows share (a prefix-
tuning adapter's KV, a template's leading tokens, a prompt that n choices fork from) is written
once into slots of its own, listed at the head of each of those rows' slots, and freed with its
last user. Slot 0 is the null slot: always zeros, the padding that gathers read past a row's end
(never stale memory, which could hold NaN).

The pool is reserved from `torch.empty`: on a CPU only the pages that rows touch become resident,
and the free list hands out the lowest blocks first so they stay few.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch


class KVPoolFull(RuntimeError):
    """More blocks were asked for than are free; the scheduler's reservations prevent it."""


@dataclass
class _SharedPrefix:
    slots: torch.Tensor  # [n] long
    blocks: list[int]
    users: int = 0


class KVPool:
    """Key/value slots for all layers, handed out in blocks."""

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        tokens: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.block_size = block_size
        self.num_blocks = math.ceil(tokens / block_size) + 1  # + the null block
        shape = (layers, self.num_blocks * block_size, kv_heads, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # [layers, slots, kv_heads, head_dim]
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.keys[:, :block_size].zero_()  # the null block
        self.values[:, :block_size].zero_()
        self.device = device
        self._free = list(range(1, self.num_blocks))  # a heap: lowest block first
        self._shared: dict[str, _SharedPrefix] = {}
        self._offsets = torch.arange(block_size, device=device)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    # --- blocks ----------------------------------------------------------------------------------

    def allocate(self, blocks: int) -> tuple[list[int], torch.Tensor]:
        """`blocks` free blocks and their slots, [blocks * block_size] long, in order."""
        if blocks > len(self._free):
            raise KVPoolFull(f"asked for {blocks} KV blocks, {len(self._free)} are free")
        taken = [heapq.heappop(self._free) for _ in range(blocks)]
        return taken, self.slots_of(taken)

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)

    def slots_of(self, blocks: list[int]) -> torch.Tensor:
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return (index[:, None] * self.block_size + self._offsets).flatten()

    # --- shared prefixes ---------------------------------------------------------------------------

    def acquire_prefix(self, key: str, kv: torch.Tensor) -> torch.Tensor:
        """Slots holding `kv` ([layers, 2, kv_heads, n, head_dim]), written on first use; one more user."""
        shared = self._shared.get(key)
        if shared is None:
            n = kv.shape[3]
            blocks, slots = self.allocate(self.blocks_for(n))
            slots = slots[:n]
            self.keys[:, slots] = kv[:, 0].transpose(1, 2).to(self.keys.dtype)  # [layers, n, kv_heads, head_dim]
            self.values[:, slots] = kv[:, 1].transpose(1, 2).to(self.values.dtype)
            shared = self._shared[key] = _SharedPrefix(slots=slots, blocks=blocks)
        shared.users += 1
        return shared.slots

    def share(self, key: str, blocks: list[int], users: int) -> None:
        """Hand `blocks` (already written) over to `users` holders; they go back when the last one releases."""
        self._shared[key] = _SharedPrefix(slots=self.slots_of(blocks), blocks=blocks, users=users)

    def release_prefix(self, key: str) -> None:
        shared = self._shared[key]
        shared.users -= 1
        if shared.users == 0:
            del self._shared[key]
            self.free(shared.blocks)

    # --- reads and writes, per layer -------------------------------------------------------------------

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [n, kv_heads, head_dim] into `slots` [n]."""
        self.keys[layer].index_copy_(0, slots, keys)
        self.values[layer].index_copy_(0, slots, values)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values at `slots` (any shape S) -> [*S, kv_heads, head_dim] each."""
        flat = slots.reshape(-1)
        keys = self.keys[layer].index_select(0, flat)
        values = self.values[layer].index_select(0, flat)
        return keys.view(*slots.shape, *keys.shape[1:]), values.view(*slots.shape, *values.shape[1:])
