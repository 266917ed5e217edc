"""Where resident per-layer weights (LoRA family, IA³) live on the device: a slot pool per family of layers.

A family is one linear layer of the decoder block across the whole stack
(`model.layers.{}.self_attn.q_proj`). For each family the pool keeps one tensor per kind of
weight, with a slot per resident adapter:

    LoRA:     A [layers, slots, rank, in], B [layers, slots, out, rank], scaling [layers, slots]
    vectors:  [layers, slots, width], one table per side (`scale_in`, `scale_out`: slot 0 all ones;
              `shift_out`: slot 0 all zeros), i.e. no change

An adapter takes one slot in each family it touches when it becomes resident and gives it back
when evicted, so its weights are held once, and a step tells each layer no more than a slot per
row. Ranks below the family's largest are zero-padded (exact zeros in every sum), and a layer an
adapter leaves alone keeps zeros (LoRA, shifts) or ones (scales) at its slot. Slots and ranks grow on demand;
a grown tensor keeps every slot where it was, so a step that read the old one stays right.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace

import torch

from server.engine.adapters.base import VECTOR_SIDES, LoadedAdapter, PoolSlots, VeraBasis
from server.engine.backbone import Geometry

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def family_of(module: str) -> tuple[str, int]:
    """'model.layers.7.mlp.down_proj' -> ('model.layers.{}.mlp.down_proj', 7); modules outside a stack: layer 0."""
    match = _LAYER_INDEX.search(module)
    if match is None:
        return module, 0
    return f"{module[: match.start()]}.{{}}.{module[match.end() :]}", int(match.group(1))


class _Slots:
    """Slot bookkeeping of one pooled tensor set: slot 0 is reserved, the rest handed out lowest first."""

    def __init__(self) -> None:
        self.capacity = 0
        self.free: list[int] = []

    def take(self) -> int | None:
        return self.free.pop(0) if self.free else None

    def give_back(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort()

    def grow(self, capacity: int) -> None:
        self.free += range(max(self.capacity, 1), capacity)
        self.capacity = capacity


class LoraFamily:
    """One family's LoRA weights for every resident adapter."""

    def __init__(self, layers: int, in_features: int, out_features: int, device: torch.device):
        self.layers, self.in_features, self.out_features, self.device = layers, in_features, out_features, device
        self.slots = _Slots()
        self.rank = 0
        self.generation = 0  # bumped whenever a slot's weights change: gathered copies key on it
        self.a = torch.zeros(layers, 0, 0, in_features, device=device)  # [layers, slots, rank, in]
        self.b = torch.zeros(layers, 0, out_features, 0, device=device)  # [layers, slots, out, rank]
        self.scaling = torch.zeros(layers, 0, device=device)  # [layers, slots]
        # host-side, read by segmented steps without touching the device: [layer][slot]
        self.host_scaling: list[list[float]] = [[] for _ in range(layers)]
        self.host_rank: list[list[int]] = [[] for _ in range(layers)]  # 0 where the slot has no LoRA
        self.views: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [[] for _ in range(layers)]  # A^T, B^T

    def install(self, modules: dict[int, tuple[torch.Tensor, torch.Tensor, float]]) -> int:
        """modules: layer -> (A [r, in], B [out, r], scaling); returns the slot."""
        rank = max(a.shape[0] for a, _, _ in modules.values())
        slot = self.slots.take()
        if slot is None or rank > self.rank:
            self._resize(max(4, 2 * self.slots.capacity) if slot is None else self.slots.capacity, max(rank, self.rank))
            slot = slot if slot is not None else self.slots.take()
        self.a[:, slot].zero_()
        self.b[:, slot].zero_()
        self.scaling[:, slot] = 0.0
        self._set_host(slot, {})
        for layer, (a, b, scaling) in modules.items():
            r = a.shape[0]
            self.a[layer, slot, :r] = a
            self.b[layer, slot, :, :r] = b
            self.scaling[layer, slot] = scaling
        self._set_host(slot, {layer: (a.shape[0], s) for layer, (a, _, s) in modules.items()})
        self.generation += 1
        return slot

    def release(self, slot: int) -> None:
        self._set_host(slot, {})
        self.slots.give_back(slot)
        self.generation += 1

    def _set_host(self, slot: int, ranks: dict[int, tuple[int, float]]) -> None:
        for layer in range(self.layers):
            rank, scaling = ranks.get(layer, (0, 0.0))
            self.host_rank[layer][slot], self.host_scaling[layer][slot] = rank, scaling
            self.views[layer][slot] = (self.a[layer, slot, :rank].T, self.b[layer, slot, :, :rank].T) if rank else None

    def _resize(self, capacity: int, rank: int) -> None:
        old = self.slots.capacity
        a = torch.zeros(self.layers, capacity, rank, self.in_features, device=self.device)
        b = torch.zeros(self.layers, capacity, self.out_features, rank, device=self.device)
        scaling = torch.zeros(self.layers, capacity, device=self.device)
        a[:, :old, : self.rank] = self.a
        b[:, :old, :, : self.rank] = self.b
        scaling[:, :old] = self.scaling
        self.a, self.b, self.scaling, self.rank = a, b, scaling, rank  # steps in flight keep the old tensors
        for layer in range(self.layers):
            self.host_scaling[layer] += [0.0] * (capacity - old)
            self.host_rank[layer] += [0] * (capacity - old)
            self.views[layer] = [
                (a[layer, slot, :r].T, b[layer, slot, :, :r].T) if (r := self.host_rank[layer][slot]) else None
                for slot in range(capacity)
            ]
        self.slots.grow(capacity)
        self.generation += 1

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel() + self.scaling.numel()) * 4


class VectorFamily:
    """One family's vectors on one side (input scale, output scale or output shift) for every resident adapter."""

    def __init__(self, layers: int, width: int, device: torch.device, neutral: float):
        self.layers, self.width, self.device, self.neutral = layers, width, device, neutral
        self.slots = _Slots()
        self.vectors = torch.full((layers, 0, width), neutral, device=device)  # [layers, slots, width]

    def install(self, vectors: dict[int, torch.Tensor]) -> int:
        slot = self.slots.take()
        if slot is None:
            capacity = max(4, 2 * self.slots.capacity)
            grown = torch.full((self.layers, capacity, self.width), self.neutral, device=self.device)
            grown[:, : self.slots.capacity] = self.vectors
            self.vectors = grown
            self.slots.grow(capacity)
            slot = self.slots.take()
        self.vectors[:, slot] = self.neutral
        for layer, vector in vectors.items():
            self.vectors[layer, slot] = vector
        return slot

    def release(self, slot: int) -> None:
        self.slots.give_back(slot)

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * 4


NEUTRAL = {"scale_in": 1.0, "scale_out": 1.0, "shift_out": 0.0}  # the value that changes nothing, per side


class AdapterPool:
    """Every family's pooled weights; installs and releases whole adapters. Thread-safe."""

    def __init__(self, geometry: Geometry, device: torch.device):
        self.device = device
        self.layout: dict[str, tuple[str, int]] = {name: family_of(name) for name in geometry.linear_modules}
        self._shapes: dict[str, tuple[int, int, int]] = {}  # family -> (layers, in, out)
        for name, shape in geometry.linear_modules.items():
            family, layer = self.layout[name]
            layers = max(self._shapes.get(family, (0, 0, 0))[0], layer + 1)
            self._shapes[family] = (layers, shape.in_features, shape.out_features)
        self.lora: dict[str, LoraFamily] = {}
        self.vectors: dict[str, dict[str, VectorFamily]] = {side: {} for side in VECTOR_SIDES}  # side -> family ->
        # VeRA: each distinct pair of projections once, with its users counted; per family and pair, each slot's
        # [lambda_d ; lambda_b] per layer
        self.vera_bases: dict[str, VeraBasis] = {}
        self._vera_users: dict[str, int] = {}
        self.vera: dict[tuple[str, str], VectorFamily] = {}
        self.generation = 0  # bumped by every install and release: a step's adapter data keys on it
        self._lock = threading.Lock()

    def install(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """The adapter with its per-layer weights moved into slots (its host copies dropped)."""
        if not adapter.has_layer_weights:
            return adapter
        lora: dict[str, dict[int, tuple]] = {}
        for name, module in adapter.lora.items():
            family, layer = self.layout[name]
            lora.setdefault(family, {})[layer] = (module.a, module.b, module.scaling)
        with self._lock:
            slots = PoolSlots()
            for family, modules in lora.items():
                layers, fan_in, fan_out = self._shapes[family]
                pooled = self.lora.setdefault(family, LoraFamily(layers, fan_in, fan_out, self.device))
                slots.lora[family] = pooled.install(
                    {layer: (a.to(self.device), b.to(self.device), s) for layer, (a, b, s) in modules.items()}
                )
            for side in VECTOR_SIDES:
                by_family: dict[str, dict[int, torch.Tensor]] = {}
                for name, vector in getattr(adapter, side).items():
                    family, layer = self.layout[name]
                    by_family.setdefault(family, {})[layer] = vector.to(self.device)
                for family, vectors in by_family.items():
                    layers, fan_in, fan_out = self._shapes[family]
                    width = fan_in if side == "scale_in" else fan_out
                    table = self.vectors[side]
                    pooled = table.setdefault(family, VectorFamily(layers, width, self.device, NEUTRAL[side]))
                    getattr(slots, side)[family] = pooled.install(vectors)
            self._install_vera(adapter, slots)
            self.generation += 1
        empty = {side: {} for side in VECTOR_SIDES}
        return replace(adapter, lora={}, vera={}, **empty, slots=slots, pooled_bytes=adapter.nbytes)

    def _install_vera(self, adapter: LoadedAdapter, slots: PoolSlots) -> None:
        by_family: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for name, module in adapter.vera.items():
            family, layer = self.layout[name]
            by_family.setdefault((family, module.basis.key), {})[layer] = torch.cat([module.lambda_d, module.lambda_b])
        for basis in {module.basis.key: module.basis for module in adapter.vera.values()}.values():
            if basis.key not in self.vera_bases:
                self.vera_bases[basis.key] = replace(basis, a=basis.a.to(self.device), b=basis.b.to(self.device))
            self._vera_users[basis.key] = self._vera_users.get(basis.key, 0) + 1
        for (family, key), vectors in by_family.items():
            layers, _, fan_out = self._shapes[family]
            width = self.vera_bases[key].a.shape[0] + fan_out
            pooled = self.vera.setdefault((family, key), VectorFamily(layers, width, self.device, 0.0))
            slots.vera[family] = (key, pooled.install({layer: v.to(self.device) for layer, v in vectors.items()}))

    def release(self, adapter: LoadedAdapter) -> None:
        """Give the adapter's slots back; call only once no running row uses it."""
        if adapter.slots is None:
            return
        with self._lock:
            for family, slot in adapter.slots.lora.items():
                self.lora[family].release(slot)
            for side in VECTOR_SIDES:
                for family, slot in getattr(adapter.slots, side).items():
                    self.vectors[side][family].release(slot)
            for family, (key, slot) in adapter.slots.vera.items():
                self.vera[(family, key)].release(slot)
            for key in {key for key, _ in adapter.slots.vera.values()}:
                self._vera_users[key] -= 1
                if not self._vera_users[key]:  # its last user is gone: so are the projections and their tables
                    del self.vera_bases[key], self._vera_users[key]
                    self.vera = {k: table for k, table in self.vera.items() if k[1] != key}
            self.generation += 1

    @property
    def nbytes(self) -> int:
        """Device bytes the pool has allocated, padding and free slots included."""
        families = [*self.lora.values(), *(f for table in self.vectors.values() for f in table.values())]
        bases = sum((basis.a.numel() + basis.b.numel()) * 4 for basis in self.vera_bases.values())
        return sum(f.nbytes for f in [*families, *self.vera.values()]) + bases
