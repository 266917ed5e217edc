"""Per-step adapter data and the hooks that apply it inside the backbone's linear layers.

Long-lived weights (`LoadedAdapter`) stay apart from what one step needs:
`AdapterBatchData` is built once per batch composition and is the only thing a
layer sees. Rows without an adapter on a layer get exactly the base output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import nn

from server.engine.adapters.base import LoadedAdapter


@dataclass(frozen=True)
class LoraBatch:
    """The LoRA rows of one linear layer in one batch composition.

    Each row's A and B are gathered, transposed and zero-padded to the batch's largest rank once
    per composition, so a step is two batched matmuls with no gather of weights.
    """

    rows: torch.Tensor  # [n] long: batch rows with a LoRA on this layer
    a: torch.Tensor  # [n, in, max_rank] fp32: each row's A^T, zero-padded ranks
    b: torch.Tensor  # [n, max_rank, out] fp32: each row's B^T, zero-padded ranks
    scaling: torch.Tensor  # [n, 1, 1] fp32
    all_rows: bool  # rows == arange(batch): skip the gather and scatter
    per_row: tuple[tuple[int, torch.Tensor, torch.Tensor, float], ...]  # (row, A, B, scaling) for the reference path


@dataclass(frozen=True)
class LayerBatch:
    """What one linear layer applies this step."""

    lora: LoraBatch | None
    ia3_in: torch.Tensor | None  # [batch, 1, in] fp32, ones for rows without IA³ here
    ia3_out: torch.Tensor | None  # [batch, 1, out] fp32, ones for rows without IA³ here

    @property
    def device(self) -> torch.device:
        return next(t for t in (self.ia3_in, self.ia3_out, self.lora and self.lora.rows) if t is not None).device


class LoraBackend(Protocol):
    def delta(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """x [batch, seq, in] -> the LoRA term for `lora.rows`, [n, seq, out] fp32."""
        ...


class LoopLoraBackend:
    """The reference: one row at a time, exactly PEFT's `lora_B(lora_A(x)) * scaling`."""

    def delta(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        outs = [
            torch.nn.functional.linear(torch.nn.functional.linear(x[row].float(), a), b) * s
            for row, a, b, s in lora.per_row
        ]
        return torch.stack(outs)


class BmmLoraBackend:
    """All LoRA rows of a layer in two batched matmuls over gathered, rank-padded weights.

    Zero-padded ranks add exact zeros, so rows of different ranks share one
    call; the sum order can differ from PEFT's unpadded matmul by an ULP.
    """

    def delta(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        xs = x if lora.all_rows else x.index_select(0, lora.rows)  # [n, seq, in]
        return torch.bmm(torch.bmm(xs.float(), lora.a), lora.b) * lora.scaling  # [n, seq, out]


LORA_BACKENDS: dict[str, type[LoraBackend]] = {"bmm": BmmLoraBackend, "loop": LoopLoraBackend}


class AdapterBatchData:
    """Per-layer adapter tensors for one batch composition (rows in batch order)."""

    def __init__(self, layers: dict[str, LayerBatch]):
        self.layers = layers

    @classmethod
    def build(cls, adapters: Sequence[LoadedAdapter | None], device: torch.device) -> AdapterBatchData | None:
        """None when no row has a per-step adapter: the base model runs untouched."""
        names = {name for ad in adapters if ad is not None for name in (*ad.lora, *ad.ia3)}
        if not names:
            return None
        return cls({name: _layer_batch(name, adapters, device) for name in sorted(names)})

    def select(self, keep: Sequence[int], batch_size: int) -> AdapterBatchData | None:
        """The data for rows `keep` of this composition, without rebuilding it from the adapters."""
        device = next(iter(self.layers.values())).device
        keep_t = torch.tensor(list(keep), dtype=torch.long, device=device)
        new_index = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        new_index[keep_t] = torch.arange(len(keep), device=device)
        layers = {}
        for name, layer in self.layers.items():
            selected = LayerBatch(
                lora=_select_lora(layer.lora, new_index, set(keep), len(keep)),
                ia3_in=_select_scales(layer.ia3_in, keep_t),
                ia3_out=_select_scales(layer.ia3_out, keep_t),
            )
            if selected.lora is not None or selected.ia3_in is not None or selected.ia3_out is not None:
                layers[name] = selected
        return AdapterBatchData(layers) if layers else None


def _select_scales(scales: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    """The kept rows' IA³ vectors; None when they are all ones (no kept row has IA³ here)."""
    if scales is None:
        return None
    kept = scales.index_select(0, keep)
    return None if bool((kept == 1).all()) else kept


def _select_lora(lora: LoraBatch | None, new_index: torch.Tensor, keep: set[int], batch_size: int):
    if lora is None:
        return None
    kept = [i for i, (row, *_) in enumerate(lora.per_row) if row in keep]
    if not kept:
        return None
    positions = torch.tensor(kept, dtype=torch.long, device=lora.rows.device)
    rows = new_index.index_select(0, lora.rows.index_select(0, positions))
    return LoraBatch(
        rows=rows,
        a=lora.a.index_select(0, positions),
        b=lora.b.index_select(0, positions),
        scaling=lora.scaling.index_select(0, positions),
        all_rows=rows.tolist() == list(range(batch_size)),
        per_row=tuple((int(new), *lora.per_row[i][1:]) for i, new in zip(kept, rows.tolist())),
    )


def _layer_batch(name: str, adapters: Sequence[LoadedAdapter | None], device: torch.device) -> LayerBatch:
    lora_rows = [(i, ad.lora[name]) for i, ad in enumerate(adapters) if ad is not None and name in ad.lora]
    ia3_rows = [(i, ad.ia3[name]) for i, ad in enumerate(adapters) if ad is not None and name in ad.ia3]
    return LayerBatch(lora=_lora_batch(lora_rows, len(adapters), device), **_ia3_vectors(ia3_rows, len(adapters)))


def _lora_batch(rows: list, batch_size: int, device: torch.device) -> LoraBatch | None:
    if not rows:
        return None
    modules = [module for _, module in rows]
    max_rank = max(m.a.shape[0] for m in modules)
    a = torch.zeros(len(rows), modules[0].a.shape[1], max_rank, device=device)
    b = torch.zeros(len(rows), max_rank, modules[0].b.shape[0], device=device)
    for i, module in enumerate(modules):
        rank = module.a.shape[0]
        a[i, :, :rank] = module.a.T
        b[i, :rank] = module.b.T
    row_ids = [row for row, _ in rows]
    return LoraBatch(
        rows=torch.tensor(row_ids, device=device),
        a=a,
        b=b,
        scaling=torch.tensor([m.scaling for m in modules], device=device)[:, None, None],
        all_rows=row_ids == list(range(batch_size)),
        per_row=tuple((row, m.a, m.b, m.scaling) for row, m in rows),
    )


def _ia3_vectors(rows: list, batch_size: int) -> dict[str, torch.Tensor | None]:
    vectors: dict[str, torch.Tensor | None] = {"ia3_in": None, "ia3_out": None}
    for field, on_input in (("ia3_in", True), ("ia3_out", False)):
        mine = [(i, m) for i, m in rows if m.on_input == on_input]
        if not mine:
            continue
        width = mine[0][1].vector.shape[0]
        stacked = torch.ones(batch_size, 1, width, device=mine[0][1].vector.device)
        for i, module in mine:
            stacked[i, 0] = module.vector
        vectors[field] = stacked
    return vectors


class AdapterHooks:
    """Forward hooks on every adaptable linear layer; they read the step's `AdapterBatchData`.

    Hooks, not wrapper modules, so the backbone's module tree and weights stay
    exactly as loaded.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], backend: LoraBackend):
        self.backend = backend
        self.current: AdapterBatchData | None = None
        modules = dict(model.named_modules())
        self._handles = []
        for name in layer_names:
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(partial(self._scale_input, name)))
            self._handles.append(module.register_forward_hook(partial(self._adapt_output, name)))

    @contextmanager
    def active(self, data: AdapterBatchData | None) -> Iterator[None]:
        self.current = data
        try:
            yield
        finally:
            self.current = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _layer(self, name: str) -> LayerBatch | None:
        return None if self.current is None else self.current.layers.get(name)

    def _scale_input(self, name: str, module: nn.Module, args: tuple):
        layer = self._layer(name)
        if layer is None or layer.ia3_in is None:
            return None
        x = args[0]
        return ((x * layer.ia3_in).to(x.dtype), *args[1:])

    def _adapt_output(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor):
        layer = self._layer(name)
        if layer is None or (layer.lora is None and layer.ia3_out is None):
            return None
        dtype = output.dtype
        out = output.float()  # the layer's fresh output (or an fp32 copy of it): ours to update in place
        if layer.ia3_out is not None:
            out.mul_(layer.ia3_out)
        if layer.lora is not None:
            delta = self.backend.delta(args[0], layer.lora)
            if layer.lora.all_rows:
                out.add_(delta)
            else:
                out.index_add_(0, layer.lora.rows, delta)
        return out.to(dtype)
