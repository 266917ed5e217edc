"""Per-step adapter data, and the hooks that apply it inside the backbone's linear layers.

Long-lived weights sit once in the `AdapterPool`; `AdapterStep`, built for each step from its
rows' slots, is the only thing a layer sees. Rows without an adapter on a layer get exactly the
base output. Rows are packed grouped by adapter, so a family's LoRA tokens come in runs of one
slot, and each run is computed the cheaper way:

- segmented (SGMV-like), for long runs (a prompt chunk, many rows of one adapter): two plain
  matmuls per run on the pool's own weights, at the adapter's own rank — no copy;
- gathered (BGMV-like), for short runs on a GPU (decoding rows of many adapters): the tokens' A and B are
  gathered once for all layers and applied with two batched matmuls per layer, whatever the number
  of adapters; the gathered weights are reused by the next steps while the same slots come back
  (a run is short, so this holds at most a few copies of an adapter, and only while it runs).

`loop` is the reference: one row at a time, exactly PEFT's `lora_B(lora_A(x)) * scaling`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from server.engine.adapters.base import VECTOR_SIDES, LoadedAdapter
from server.engine.adapters.pool import AdapterPool, LoraFamily

LoraBackendName = Literal["auto", "gathered", "segmented", "loop"]

# "auto" computes a run of one slot segmented once it has this many tokens, and gathers shorter runs. On a CPU
# two matmul calls per run cost less than any gather, however short the run (bench/lora_backends.py), so every
# run is segmented; on a GPU each call is a kernel launch, and short runs of many adapters are gathered into one
# batched matmul, as Punica's BGMV does (a guess until measured on a GPU: docs/benchmarks.md).
SEGMENT_MIN_TOKENS = {"cpu": 1, "cuda": 8}

Segment = tuple[int, int, int]  # packed tokens start:end share pool slot `slot`


@dataclass(frozen=True)
class Gathered:
    """Some tokens' LoRA weights, one row per token, for every layer of a family."""

    key: tuple  # (the family's generation, the tokens' slots): equal keys, equal weights
    a: torch.Tensor  # [layers, n, rank, in]
    b: torch.Tensor  # [layers, n, out, rank]
    scaling: torch.Tensor  # [layers, n, 1]

    @classmethod
    def of(cls, family: LoraFamily, slots: tuple[int, ...], previous: Gathered | None) -> Gathered:
        key = (family.generation, slots)
        if previous is not None and previous.key == key:
            return previous
        index = torch.tensor(slots, device=family.a.device)
        return cls(
            key=key,
            a=family.a.index_select(1, index),
            b=family.b.index_select(1, index),
            scaling=family.scaling.index_select(1, index)[:, :, None],
        )


@dataclass(frozen=True)
class LoraStep:
    """The tokens of one step that carry a LoRA in one family, and how each part is computed."""

    runs: tuple[Segment, ...]  # computed run by run: segmented, or by the reference loop
    reference: bool  # runs go through the per-row reference loop
    gathered: Gathered | None  # the short runs' tokens, gathered
    tokens: torch.Tensor | None  # [n] long: packed indices of the gathered tokens; None: all tokens, in order


@dataclass(frozen=True)
class AdapterStep:
    """What every adaptable layer applies in one step, by family."""

    lora: dict[str, LoraStep]
    # side -> family -> [layers, tokens, width]: each token's vector (neutral where its row has none)
    vectors: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def build(
        cls,
        spans: Sequence[tuple[LoadedAdapter | None, int]],
        pool: AdapterPool,
        backend: LoraBackendName = "auto",
        previous: AdapterStep | None = None,
    ) -> AdapterStep | None:
        """spans: each row's adapter and token count, in packed order; `previous` lends its gathered weights.

        None when no row needs a per-step adapter.
        """
        placed, start = [], 0
        for adapter, n in spans:
            if adapter is not None and adapter.slots is not None:
                placed.append((adapter.slots, start, n))
            start += n
        if not placed:
            return None
        total, device = start, pool.device
        lora = {}
        for family in sorted({f for slots, _, _ in placed for f in slots.lora}):
            rows = [(slots.lora[family], s, n) for slots, s, n in placed if family in slots.lora]
            before = previous.lora.get(family) if previous is not None else None
            lora[family] = _lora_step(pool.lora[family], rows, total, device, backend, before)
        vectors: dict[str, dict[str, torch.Tensor]] = {}
        for side in VECTOR_SIDES:
            per_token = {}
            for family in sorted({f for slots, _, _ in placed for f in getattr(slots, side)}):
                token_slots = [0] * total
                for slots, s, n in placed:
                    if family in getattr(slots, side):
                        token_slots[s : s + n] = [getattr(slots, side)[family]] * n
                table = pool.vectors[side][family].vectors
                per_token[family] = table.index_select(1, torch.tensor(token_slots, device=device))
            vectors[side] = per_token
        return cls(lora=lora, vectors=vectors)


def _lora_step(family, rows, total, device, backend: LoraBackendName, before: LoraStep | None) -> LoraStep:
    segments: list[Segment] = []
    for slot, start, n in rows:
        if backend != "loop" and segments and segments[-1][2] == slot and segments[-1][1] == start:
            segments[-1] = (segments[-1][0], start + n, slot)  # rows of one adapter side by side: one run
        else:
            segments.append((start, start + n, slot))
    if backend in ("segmented", "loop"):
        runs, short = segments, []
    elif backend == "gathered":
        runs, short = [], segments
    else:
        least = SEGMENT_MIN_TOKENS.get(device.type, 1)
        runs = [s for s in segments if s[1] - s[0] >= least]
        short = [s for s in segments if s[1] - s[0] < least]
    gathered, tokens = None, None
    if short:
        slots = tuple(slot for start, end, slot in short for _ in range(start, end))
        gathered = Gathered.of(family, slots, before.gathered if before is not None else None)
        every = len(slots) == total  # then the short runs cover every token, in order
        if not every:
            tokens = torch.tensor([t for start, end, _ in short for t in range(start, end)], device=device)
    return LoraStep(runs=tuple(runs), reference=backend == "loop", gathered=gathered, tokens=tokens)


# --- LoRA arithmetic --------------------------------------------------------------------------------


def lora_gathered(x: torch.Tensor, out: torch.Tensor, layer: int, step: LoraStep) -> None:
    """out [tokens, out] += the gathered tokens' terms. x [tokens, in] fp32."""
    g = step.gathered
    xs = x if step.tokens is None else x.index_select(0, step.tokens)  # [n, in]
    h = torch.bmm(g.a[layer], xs[:, :, None])  # [n, rank, 1]
    delta = torch.bmm(g.b[layer], h)[:, :, 0] * g.scaling[layer]  # [n, out]
    if step.tokens is None:
        out += delta
    else:
        out.index_add_(0, step.tokens, delta)


def lora_segmented(x: torch.Tensor, out: torch.Tensor, family: LoraFamily, layer: int, step: LoraStep) -> None:
    """Each run as two matmuls on the pool's own weights, at the adapter's own rank."""
    views, scalings = family.views[layer], family.host_scaling[layer]
    for start, end, slot in step.runs:
        if views[slot] is not None:
            a_t, b_t = views[slot]  # [in, rank], [rank, out]
            out[start:end].addmm_(x[start:end] @ a_t, b_t, alpha=scalings[slot])


def lora_loop(x: torch.Tensor, out: torch.Tensor, family: LoraFamily, layer: int, step: LoraStep) -> None:
    """The reference: PEFT's `lora_B(lora_A(x)) * scaling`, one row at a time."""
    for start, end, slot in step.runs:
        rank = family.host_rank[layer][slot]
        if rank:
            a, b = family.a[layer, slot, :rank], family.b[layer, slot, :, :rank]
            delta = nn.functional.linear(nn.functional.linear(x[start:end], a), b)
            out[start:end] += delta * family.host_scaling[layer][slot]


def apply_lora(x: torch.Tensor, out: torch.Tensor, family: LoraFamily, layer: int, step: LoraStep) -> None:
    """out [tokens, out] += the step's LoRA terms for this family's layer. x [tokens, in] fp32."""
    if step.gathered is not None:
        lora_gathered(x, out, layer, step)
    if step.runs:
        (lora_loop if step.reference else lora_segmented)(x, out, family, layer, step)


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
        if step is None or family not in step.vectors["scale_in"]:
            return None
        x = args[0]  # [1, tokens, in]
        return ((x * step.vectors["scale_in"][family][layer]).to(x.dtype), *args[1:])

    def _adapt_output(self, family: str, layer: int, module: nn.Module, args: tuple, output: torch.Tensor):
        step = self.current
        if step is None:
            return None
        scale, shift = step.vectors["scale_out"].get(family), step.vectors["shift_out"].get(family)
        lora = step.lora.get(family)
        if scale is None and shift is None and lora is None:
            return None
        dtype = output.dtype
        out = output.float()  # [1, tokens, out]: the layer's fresh output (or an fp32 copy): ours to update
        if scale is not None:
            out[0] *= scale[layer]
        if shift is not None:
            out[0] += shift[layer]
        if lora is not None:
            apply_lora(args[0][0].float(), out[0], self.pool.lora[family], layer, lora)
        return out.to(dtype)
