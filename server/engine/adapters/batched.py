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

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from server.engine.adapters.base import VECTOR_SIDES, AdaptionModule, LoadedAdapter
from server.engine.adapters.pool import NEUTRAL, AdapterPool, LoraFamily

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
    def of(
        cls, family: LoraFamily, slots: tuple[int, ...], previous: Gathered | None, weights: tuple[float, ...] = ()
    ) -> Gathered:
        """`weights`: each token's adapter_scale, folded into its scaling (all 1 when empty)."""
        weights = weights if any(w != 1.0 for w in weights) else ()
        key = (family.generation, slots, weights)
        if previous is not None and previous.key == key:
            return previous
        index = torch.tensor(slots, device=family.a.device)
        scaling = family.scaling.index_select(1, index)[:, :, None]
        if weights:
            scaling = scaling * torch.tensor(weights, device=scaling.device)[None, :, None]
        return cls(key=key, a=family.a.index_select(1, index), b=family.b.index_select(1, index), scaling=scaling)


@dataclass(frozen=True)
class LoraStep:
    """The tokens of one step that carry a LoRA in one family, and how each part is computed."""

    runs: tuple[Segment, ...]  # computed run by run: segmented, or by the reference loop
    reference: bool  # runs go through the per-row reference loop
    gathered: Gathered | None  # the short runs' tokens, gathered
    tokens: torch.Tensor | None  # [n] long: packed indices of the gathered tokens; None: all tokens, in order
    weights: tuple[float, ...] | None = None  # each run's adapter_scale; None: all 1


@dataclass(frozen=True)
class VeraRun:
    """The tokens of one step whose rows use one pair of VeRA projections in one family."""

    a: torch.Tensor  # [r, largest in]: the shared projections, as pooled
    b: torch.Tensor  # [largest out, r]
    tokens: torch.Tensor  # [n] long: their packed indices
    vectors: torch.Tensor  # [layers, n, r + out]: each token's [lambda_d ; lambda_b]


@dataclass(frozen=True)
class AdapterStep:
    """What every adaptable layer applies in one step, by family."""

    lora: dict[str, LoraStep]
    # side -> family -> [layers, tokens, width]: each token's vector (neutral where its row has none)
    vectors: dict[str, dict[str, torch.Tensor]]
    vera: dict[str, tuple[VeraRun, ...]]  # family -> one run per pair of projections its rows use
    # LLaMA-Adapter: packed tokens start:end and their row's prompt per attention module
    adaption: tuple[tuple[int, int, dict[str, AdaptionModule]], ...] = ()
    key: tuple = ()  # (pool generation, backend, each span's slots and length): equal keys, equal step data

    @classmethod
    def build(
        cls,
        spans: Sequence[tuple[LoadedAdapter | None, int] | tuple[LoadedAdapter | None, int, float]],
        pool: AdapterPool,
        backend: LoraBackendName = "auto",
        previous: AdapterStep | None = None,
    ) -> AdapterStep | None:
        """spans: each row's adapter, token count and optionally its adapter_scale (default 1), in packed order;
        `previous` lends its gathered weights.

        None when no row needs a per-step adapter. A row's scale weights its per-layer delta (`weighted`).
        """
        placed, adaption, start = [], [], 0
        for adapter, n, *scale in spans:
            if adapter is not None and adapter.slots is not None:
                placed.append((adapter.slots, start, n, scale[0] if scale else 1.0))
            if adapter is not None and adapter.adaption:
                adaption.append((start, start + n, adapter.adaption))
            start += n
        if not placed and not adaption:
            return None
        # A decoding batch repeats its last step's layout: reuse that step whole (the slots objects are the pool's,
        # replaced only by an install or a release, which bump the generation).
        key = (pool.generation, backend, start, tuple((id(slots), s, n, w) for slots, s, n, w in placed))
        key += (tuple((id(prompts), s, e) for s, e, prompts in adaption),)
        if previous is not None and previous.key == key:
            return previous
        total, device = start, pool.device
        weights = None  # [tokens]: each token's adapter_scale, when some row's is not 1
        if any(w != 1.0 for *_, w in placed):
            per_token = [1.0] * total
            for _, s, n, w in placed:
                per_token[s : s + n] = [w] * n
            weights = torch.tensor(per_token, device=device)
        lora = {}
        for family in sorted({f for slots, *_ in placed for f in slots.lora}):
            rows = [(slots.lora[family], s, n, w) for slots, s, n, w in placed if family in slots.lora]
            before = previous.lora.get(family) if previous is not None else None
            lora[family] = _lora_step(pool.lora[family], rows, total, device, backend, before)
        vectors: dict[str, dict[str, torch.Tensor]] = {}
        for side in VECTOR_SIDES:
            per_token = {}
            for family in sorted({f for slots, *_ in placed for f in getattr(slots, side)}):
                token_slots = [0] * total
                for slots, s, n, _ in placed:
                    if family in getattr(slots, side):
                        token_slots[s : s + n] = [getattr(slots, side)[family]] * n
                table = pool.vectors[side][family].vectors
                per_token[family] = weighted(
                    table.index_select(1, torch.tensor(token_slots, device=device)), weights, NEUTRAL[side]
                )
            vectors[side] = per_token
        vera = _vera_runs(placed, pool, device, weights)
        return cls(lora=lora, vectors=vectors, vera=vera, adaption=tuple(adaption), key=key)


def weighted(vectors: torch.Tensor, weights: torch.Tensor | None, neutral: float) -> torch.Tensor:
    """Per-token vectors [layers, tokens, width] moved toward `neutral` by each token's adapter_scale s:
    `s·v + (1 − s)·neutral` (a scale 1 + s·(v − 1), a shift s·v), which is exactly v at s = 1 and `neutral` at 0."""
    if weights is None:
        return vectors
    w = weights[None, :, None]
    return vectors * w + neutral * (1 - w)


def _vera_runs(placed, pool: AdapterPool, device: torch.device, weights) -> dict[str, tuple[VeraRun, ...]]:
    groups: dict[str, dict[str, tuple[list[int], list[int]]]] = {}  # family -> basis -> (tokens, their slots)
    for slots, start, n, _ in placed:
        for family, (key, slot) in slots.vera.items():
            tokens, token_slots = groups.setdefault(family, {}).setdefault(key, ([], []))
            tokens += range(start, start + n)
            token_slots += [slot] * n
    runs = {}
    for family, by_basis in groups.items():
        family_runs = []
        for key, (tokens, token_slots) in sorted(by_basis.items()):
            index = torch.tensor(tokens, device=device)
            vectors = pool.vera[(family, key)].vectors.index_select(1, torch.tensor(token_slots, device=device))
            if weights is not None:  # lambda_b times the row's adapter_scale
                rank = pool.vera_bases[key].a.shape[0]
                vectors[:, :, rank:] *= weights.index_select(0, index)[None, :, None]
            family_runs.append(
                VeraRun(a=pool.vera_bases[key].a, b=pool.vera_bases[key].b, tokens=index, vectors=vectors)
            )
        runs[family] = tuple(family_runs)
    return runs


def _lora_step(family, rows, total, device, backend: LoraBackendName, before: LoraStep | None) -> LoraStep:
    segments: list[Segment] = []
    weights: list[float] = []  # each segment's adapter_scale
    for slot, start, n, w in rows:
        if w == 0.0:
            continue  # scale 0: the row gets the backbone's output, exactly
        if backend != "loop" and segments and segments[-1][2] == slot and segments[-1][1] == start and weights[-1] == w:
            segments[-1] = (segments[-1][0], start + n, slot)  # rows of one adapter side by side: one run
        else:
            segments.append((start, start + n, slot))
            weights.append(w)
    scale_of = dict(zip(segments, weights))
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
        token_weights = tuple(scale_of[s] for s in short for _ in range(s[0], s[1]))
        gathered = Gathered.of(family, slots, before.gathered if before is not None else None, token_weights)
        every = len(slots) == total  # then the short runs cover every token, in order
        if not every:
            tokens = torch.tensor([t for start, end, _ in short for t in range(start, end)], device=device)
    run_weights = tuple(scale_of[s] for s in runs) if any(w != 1.0 for w in weights) else None
    return LoraStep(
        runs=tuple(runs), reference=backend == "loop", gathered=gathered, tokens=tokens, weights=run_weights
    )


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
    for i, (start, end, slot) in enumerate(step.runs):
        if views[slot] is not None:
            a_t, b_t = views[slot]  # [in, rank], [rank, out]
            alpha = scalings[slot] if step.weights is None else scalings[slot] * step.weights[i]
            out[start:end].addmm_(x[start:end] @ a_t, b_t, alpha=alpha)


def lora_loop(x: torch.Tensor, out: torch.Tensor, family: LoraFamily, layer: int, step: LoraStep) -> None:
    """The reference: PEFT's `lora_B(lora_A(x)) * scaling`, one row at a time."""
    for i, (start, end, slot) in enumerate(step.runs):
        rank = family.host_rank[layer][slot]
        if rank:
            a, b = family.a[layer, slot, :rank], family.b[layer, slot, :, :rank]
            delta = nn.functional.linear(nn.functional.linear(x[start:end], a), b)
            weight = 1.0 if step.weights is None else step.weights[i]
            out[start:end] += delta * (family.host_scaling[layer][slot] * weight)


def apply_vera(x: torch.Tensor, out: torch.Tensor, layer: int, runs: tuple[VeraRun, ...]) -> None:
    """out [tokens, out] += PEFT's `lambda_b * linear(lambda_d * linear(x, A[:, :in]), B[:out])` per run."""
    fan_in, fan_out = x.shape[1], out.shape[1]
    for run in runs:
        rank = run.a.shape[0]
        vectors = run.vectors[layer]  # [n, r + out]
        h = x.index_select(0, run.tokens) @ run.a[:, :fan_in].T * vectors[:, :rank]  # [n, r]
        out.index_add_(0, run.tokens, (h @ run.b[:fan_out].T) * vectors[:, rank:])


def gated_prompt_attention(
    hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: nn.Module, prompt: AdaptionModule
) -> torch.Tensor:
    """PEFT's AdaptedAttention term for some tokens: o_proj(gate * softmax(q K_p^T / sqrt(d)) V_p), [n, hidden].

    hidden [n, hidden] is the attention's input; cos, sin [n, head_dim] the tokens' rotary embeddings. The
    projections are called as plain linear maps, never through the per-row adapter hooks.
    """
    kv_heads, _, head_dim = prompt.keys.shape
    q_proj, o_proj = attention.q_proj, attention.o_proj
    q = F.linear(hidden, q_proj.weight, q_proj.bias).view(hidden.shape[0], -1, head_dim)  # [n, heads, d]
    half = head_dim // 2
    q = q * cos[:, None] + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin[:, None]  # RoPE, as llama's
    group = q.shape[1] // kv_heads
    keys = prompt.keys.repeat_interleave(group, dim=0)  # [heads, len, d]
    values = prompt.values.repeat_interleave(group, dim=0)
    scores = q.transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(head_dim)  # [heads, n, len]
    scores = prompt.gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = (scores @ values).transpose(0, 1).reshape(hidden.shape[0], -1)  # [n, heads * d]
    return F.linear(out, o_proj.weight, o_proj.bias)


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
        # (layer, its input before `scale_in`): the LoRA-family terms read the layer's own input, as in the form
        # `base(x * scale_in) * scale_out + shift_out + B(A x)` (a composite's IA³ may scale a LoRA's layer)
        self._unscaled: tuple[nn.Module, torch.Tensor] | None = None
        modules = dict(model.named_modules())
        self._handles = []
        for name, (family, layer) in pool.layout.items():
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(partial(self._scale_input, family, layer)))
            self._handles.append(module.register_forward_hook(partial(self._adapt_output, family, layer)))
        for name, module in modules.items():  # attention with q/k/v/o projections: where LLaMA-Adapter attends
            if all(f"{name}.{p}" in pool.layout for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                hook = partial(self._attend_to_prompt, name)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

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
        self._unscaled = (module, x)
        return ((x * step.vectors["scale_in"][family][layer]).to(x.dtype), *args[1:])

    def _adapt_output(self, family: str, layer: int, module: nn.Module, args: tuple, output: torch.Tensor):
        step, unscaled, self._unscaled = self.current, self._unscaled, None
        if step is None:
            return None
        scale, shift = step.vectors["scale_out"].get(family), step.vectors["shift_out"].get(family)
        lora, vera = step.lora.get(family), step.vera.get(family)
        if scale is None and shift is None and lora is None and vera is None:
            return None
        dtype = output.dtype
        inputs = unscaled[1] if unscaled is not None and unscaled[0] is module else args[0]
        out = output.float()  # [1, tokens, out]: the layer's fresh output (or an fp32 copy): ours to update
        if scale is not None:
            out[0] *= scale[layer]
        if shift is not None:
            out[0] += shift[layer]
        x = inputs[0].float() if lora is not None or vera is not None else None  # [tokens, in]
        if lora is not None:
            apply_lora(x, out[0], self.pool.lora[family], layer, lora)
        if vera is not None:
            apply_vera(x, out[0], layer, vera)
        return out.to(dtype)

    def _attend_to_prompt(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: tuple):
        step = self.current
        runs = [(start, end, m[name]) for start, end, m in step.adaption if name in m] if step is not None else []
        if not runs:
            return None
        hidden = kwargs["hidden_states"][0] if "hidden_states" in kwargs else args[0][0]  # [tokens, hidden]
        cos, sin = (t[0] for t in kwargs["position_embeddings"])  # [tokens, head_dim]
        out = output[0].clone()  # [1, tokens, hidden]
        for start, end, prompt in runs:
            term = gated_prompt_attention(hidden[start:end], cos[start:end], sin[start:end], module, prompt)
            out[0, start:end] += term
        return (out, *output[1:])
