"""Per-step adapter data, and the hooks that apply it inside the backbone's linear layers.

Long-lived weights sit once in the `AdapterPool`; `AdapterStep`, built for each step from its
rows' slots, is the only thing a layer sees: for each family, which packed tokens carry which
slot. Rows without an adapter on a layer get exactly the base output.

LoRA has three ways to compute a family's term, chosen per step by the step's shape:

- gathered (BGMV-like): each token's A and B gathered from the pool by its slot, two batched
  matmuls — one call whatever the number of adapters, at the price of a per-token weight gather;
- segmented (SGMV-like): rows are packed grouped by adapter, so tokens sharing a slot are one
  contiguous run, and each run is two plain matmuls on the pool's own weights (no copy);
- loop: the reference, one row at a time, exactly PEFT's `lora_B(lora_A(x)) * scaling`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from server.engine.adapters.base import LoadedAdapter
from server.engine.adapters.pool import AdapterPool, LoraFamily

LoraBackendName = Literal["auto", "gathered", "segmented", "loop"]

# "auto" runs a family segmented once its LoRA tokens average this many per run of one slot: then
# a few plain matmuls beat gathering every token's weights (measured in bench/lora_backends.py).
SEGMENT_MIN_TOKENS = 4

Segment = tuple[int, int, int]  # packed tokens start:end share pool slot `slot`


@dataclass(frozen=True)
class LoraStep:
    """The tokens of one step that carry a LoRA in one family."""

    method: Literal["gathered", "segmented", "loop"]
    tokens: torch.Tensor | None  # [n] long: their packed indices; None when every token of the step has one
    slots: torch.Tensor  # [n] long: each token's slot
    segments: tuple[Segment, ...]  # runs of one slot, in packed order (one per row for the loop)


@dataclass(frozen=True)
class AdapterStep:
    """What every adaptable layer applies in one step, by family."""

    lora: dict[str, LoraStep]
    ia3_in: dict[str, torch.Tensor]  # family -> [tokens] long: each token's IA³ slot (0: none)
    ia3_out: dict[str, torch.Tensor]

    @classmethod
    def build(
        cls,
        spans: Sequence[tuple[LoadedAdapter | None, int]],
        device: torch.device,
        backend: LoraBackendName = "auto",
    ) -> AdapterStep | None:
        """spans: each row's adapter and token count, in packed order. None when no row needs a per-step adapter."""
        rows = [(adapter.slots, n) for adapter, n in spans if adapter is not None and adapter.slots is not None]
        if not rows:
            return None
        starts, total = [], 0
        for _, n in spans:
            starts.append(total)
            total += n
        placed = [
            (adapter.slots, start, n)
            for (adapter, n), start in zip(spans, starts)
            if adapter is not None and adapter.slots is not None
        ]
        lora = {
            family: _lora_step([(s.lora.get(family), start, n) for s, start, n in placed], total, device, backend)
            for family in sorted({f for slots, _ in rows for f in slots.lora})
        }
        ia3 = []
        for side in ("ia3_in", "ia3_out"):
            families = sorted({f for slots, _ in rows for f in getattr(slots, side)})
            ia3.append(
                {
                    f: _token_slots([(getattr(s, side).get(f), st, n) for s, st, n in placed], total, device)
                    for f in families
                }
            )
        return cls(lora=lora, ia3_in=ia3[0], ia3_out=ia3[1])


def _segments(rows: list[tuple[int | None, int, int]], merge: bool) -> list[Segment]:
    segments: list[Segment] = []
    for slot, start, n in rows:
        if slot is None:
            continue
        if merge and segments and segments[-1][2] == slot and segments[-1][1] == start:
            segments[-1] = (segments[-1][0], start + n, slot)
        else:
            segments.append((start, start + n, slot))
    return segments


def _lora_step(rows: list[tuple[int | None, int, int]], total: int, device, backend: LoraBackendName) -> LoraStep:
    segments = _segments(rows, merge=backend != "loop")
    count = sum(end - start for start, end, _ in segments)
    method = backend
    if backend == "auto":
        method = "segmented" if count >= SEGMENT_MIN_TOKENS * len(segments) else "gathered"
    every = count == total and len(segments) > 0 and segments[0][0] == 0
    tokens = None if every else torch.tensor([t for s, e, _ in segments for t in range(s, e)], device=device)
    slots = torch.tensor([slot for s, e, slot in segments for _ in range(s, e)], device=device)
    return LoraStep(method=method, tokens=tokens, slots=slots, segments=tuple(segments))


def _token_slots(rows: list[tuple[int | None, int, int]], total: int, device) -> torch.Tensor:
    slots = [0] * total
    for slot, start, n in rows:
        if slot is not None:
            slots[start : start + n] = [slot] * n
    return torch.tensor(slots, device=device)


# --- LoRA arithmetic --------------------------------------------------------------------------------


def lora_gathered(x: torch.Tensor, out: torch.Tensor, pool: LoraFamily, layer: int, step: LoraStep) -> None:
    """out [tokens, out] += each LoRA token's term, its weights gathered by slot. x [tokens, in] fp32."""
    xs = x if step.tokens is None else x.index_select(0, step.tokens)  # [n, in]
    a = pool.a[layer].index_select(0, step.slots)  # [n, rank, in]
    b = pool.b[layer].index_select(0, step.slots)  # [n, out, rank]
    delta = torch.bmm(b, torch.bmm(a, xs[:, :, None]))[:, :, 0]  # [n, out]
    delta *= pool.scaling[layer].index_select(0, step.slots)[:, None]
    if step.tokens is None:
        out += delta
    else:
        out.index_add_(0, step.tokens, delta)


def lora_segmented(x: torch.Tensor, out: torch.Tensor, pool: LoraFamily, layer: int, step: LoraStep) -> None:
    """Each run of one slot as two matmuls on the pool's weights, at the adapter's own rank."""
    a_all, b_all = pool.a[layer], pool.b[layer]
    ranks, scalings = pool.host_rank[layer], pool.host_scaling[layer]
    for start, end, slot in step.segments:
        rank = ranks[slot]
        if rank:
            delta = (x[start:end] @ a_all[slot, :rank].T) @ b_all[slot, :, :rank].T  # [run, out]
            out[start:end] += delta * scalings[slot]


def lora_loop(x: torch.Tensor, out: torch.Tensor, pool: LoraFamily, layer: int, step: LoraStep) -> None:
    """The reference: PEFT's `lora_B(lora_A(x)) * scaling`, one row at a time."""
    for start, end, slot in step.segments:
        rank = pool.host_rank[layer][slot]
        if rank:
            a, b = pool.a[layer, slot, :rank], pool.b[layer, slot, :, :rank]
            out[start:end] += (
                nn.functional.linear(nn.functional.linear(x[start:end], a), b) * pool.host_scaling[layer][slot]
            )


LORA_METHODS = {"gathered": lora_gathered, "segmented": lora_segmented, "loop": lora_loop}


class AdapterHooks:
    """Forward hooks on every adaptable linear layer; they read the step's `AdapterStep`.

    Hooks, not wrapper modules, so the backbone's module tree and weights stay exactly as loaded.
    """

    def __init__(self, model: nn.Module, pool: AdapterPool):
        self.pool = pool
        self.current: AdapterStep | None = None
        modules = dict(model.named_modules())
        self._handles = []
        for name, (family, layer) in pool.layout.items():
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(partial(self._scale_input, family, layer)))
            self._handles.append(module.register_forward_hook(partial(self._adapt_output, family, layer)))

    @contextmanager
    def active(self, step: AdapterStep | None) -> Iterator[None]:
        self.current = step
        try:
            yield
        finally:
            self.current = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _scale_input(self, family: str, layer: int, module: nn.Module, args: tuple):
        step = self.current
        if step is None or family not in step.ia3_in:
            return None
        x = args[0]  # [1, tokens, in]
        vectors = self.pool.ia3_in[family].vectors[layer].index_select(0, step.ia3_in[family])  # [tokens, in]
        return ((x * vectors).to(x.dtype), *args[1:])

    def _adapt_output(self, family: str, layer: int, module: nn.Module, args: tuple, output: torch.Tensor):
        step = self.current
        if step is None or (family not in step.lora and family not in step.ia3_out):
            return None
        dtype = output.dtype
        out = output.float()  # [1, tokens, out]: the layer's fresh output (or an fp32 copy): ours to update
        if family in step.ia3_out:
            out[0] *= self.pool.ia3_out[family].vectors[layer].index_select(0, step.ia3_out[family])
        lora = step.lora.get(family)
        if lora is not None:
            LORA_METHODS[lora.method](args[0][0].float(), out[0], self.pool.lora[family], layer, lora)
        return out.to(dtype)
