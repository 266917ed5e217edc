"""Composite tasks: several PEFT adapters folded into one `LoadedAdapter`, so a row carries them as one.

Semantics (docs/adapters.md, "Composite tasks"): the per-layer components act on the frozen backbone in their
stated order, each on the layers the ones before it left (an IA³ after a LoRA scales the LoRA's output too;
LoRAs on one layer add up), and the prompt-learning component, at most one, sees the adapted model. Since
`LoadedAdapter` already holds every kind's parts in one per-layer form, composing is arithmetic on those parts
at load; the engine applies a composite exactly like any other adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from adapters_store import AdapterKey
from adapters_store.composite import (
    COMPOSITE_FILE,
    COMPOSITE_KIND,
    PROMPT_LEARNING_KINDS,
    Component,
    component_files,
    parse_manifest,
)
from adapters_store.format import CONFIG_FILE, WEIGHTS_FILE, FormatError
from server.engine.adapters import load_adapter, load_peft_files
from server.engine.adapters.base import VECTOR_SIDES, AdapterError, LoadedAdapter, LoraModule, Placement
from server.engine.adapters.pool import NEUTRAL
from server.engine.backbone import Geometry

__all__ = ["load_composite", "scale_layer_weights"]


def load_composite(
    key: AdapterKey, files: Mapping[str, bytes], geometry: Geometry, placement: Placement
) -> LoadedAdapter:
    """Load each component like a single upload (errors name it), then compose them."""
    try:
        components = parse_manifest(files[COMPOSITE_FILE])
    except FormatError as exc:
        raise AdapterError(str(exc)) from None
    parts: list[tuple[Component, LoadedAdapter]] = []
    for component in components:
        try:
            peft = component_files(files, component.name)
            config, tensors = load_peft_files(peft[CONFIG_FILE], peft[WEIGHTS_FILE])
            parts.append((component, load_adapter(key, config, tensors, geometry, placement)))
        except KeyError:
            raise AdapterError(f"component {component.name!r}: its files are missing") from None
        except AdapterError as exc:
            raise AdapterError(f"component {component.name!r}: {exc}") from None
    return compose(key, parts)


def scale_layer_weights(adapter: LoadedAdapter, scale: float) -> LoadedAdapter:
    """The adapter with its per-layer delta weighted by `scale`: LoRA terms times it, scales `1 + s·(v − 1)`,
    shifts `s·v`. 0 is the backbone itself, 1 the adapter as trained (the same rule as a request's adapter_scale)."""
    if scale == 1.0:
        return adapter
    vectors = {
        side: {m: v * scale + NEUTRAL[side] * (1 - scale) for m, v in getattr(adapter, side).items()}
        for side in VECTOR_SIDES
    }
    lora = {m: replace(module, scaling=module.scaling * scale) for m, module in adapter.lora.items()}
    vera = {m: replace(module, lambda_b=module.lambda_b * scale) for m, module in adapter.vera.items()}
    return replace(adapter, lora=lora, vera=vera, **vectors)


def _layer_modules(adapter: LoadedAdapter) -> set[str]:
    return {*adapter.lora, *adapter.vera, *(m for side in VECTOR_SIDES for m in getattr(adapter, side))}


def compose(key: AdapterKey, parts: list[tuple[Component, LoadedAdapter]]) -> LoadedAdapter:
    prompts = [(c, a) for c, a in parts if a.kind in PROMPT_LEARNING_KINDS]
    if len(prompts) > 1:
        names = [c.name for c, _ in prompts]
        raise AdapterError(f"components {names} are both prompt-learning adapters; a composite holds at most one")
    out = LoadedAdapter(key=key, kind=COMPOSITE_KIND)
    owner: dict[str, str] = {}  # module -> the first component that adapted it
    for component, adapter in parts:
        if adapter.kind in PROMPT_LEARNING_KINDS:
            out.soft_prompt, out.prefix_kv, out.adaption = adapter.soft_prompt, adapter.prefix_kv, adapter.adaption
            continue
        adapter = scale_layer_weights(adapter, component.scale)
        for module in sorted(_layer_modules(adapter)):
            if module in owner:
                _stack(out, adapter, module, component.name, owner[module])
            else:
                _copy(out, adapter, module)
                owner[module] = component.name
    for attention in out.adaption:  # PEFT's gated prompt calls these projections of the (merged) layer itself
        touched = sorted(
            f"{attention}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") if f"{attention}.{p}" in owner
        )
        if touched:
            raise AdapterError(
                f"component {prompts[0][0].name!r}: LLaMA-Adapter attends through {touched}, which component "
                f"{owner[touched[0]]!r} adapts; that mix is not served (adapt the feed-forward layers instead)"
            )
    return out


def _copy(out: LoadedAdapter, adapter: LoadedAdapter, module: str) -> None:
    for side in ("lora", "vera", *VECTOR_SIDES):
        if module in getattr(adapter, side):
            getattr(out, side)[module] = getattr(adapter, side)[module]


def _stack(out: LoadedAdapter, adapter: LoadedAdapter, module: str, name: str, first: str) -> None:
    """Apply `adapter`'s weights on `module` on top of what earlier components made of it."""
    if adapter.kind == "ia3":  # scales the adapted layer's output (or input) as a whole
        if module in adapter.scale_out:
            v = adapter.scale_out[module]
            out.scale_out[module] = out.scale_out.get(module, torch.ones_like(v)) * v
            if module in out.shift_out:
                out.shift_out[module] = out.shift_out[module] * v
            if module in out.lora:
                out.lora[module] = replace(out.lora[module], b=out.lora[module].b * v[:, None])
            if module in out.vera:
                out.vera[module] = replace(out.vera[module], lambda_b=out.vera[module].lambda_b * v)
        if module in adapter.scale_in:
            u = adapter.scale_in[module]
            if module in out.vera:
                raise AdapterError(
                    f"component {name!r}: IA³ scales the input of {module!r}, which component {first!r} adapts "
                    "with VeRA (its projections are shared); put the IA³ component first"
                )
            out.scale_in[module] = out.scale_in.get(module, torch.ones_like(u)) * u
            if module in out.lora:
                out.lora[module] = replace(out.lora[module], a=out.lora[module].a * u[None, :])
        return
    if any(module in getattr(adapter, side) for side in VECTOR_SIDES):
        raise AdapterError(
            f"component {name!r}: DoRA or trained biases on {module!r}, which component {first!r} already adapts; "
            "they are relative to the layer's own weights, so that mix is not served (put this component first)"
        )
    if module in adapter.vera:
        if module in out.vera:
            raise AdapterError(f"component {name!r}: VeRA on {module!r}, which component {first!r} adapts with VeRA")
        out.vera[module] = adapter.vera[module]
    if module in adapter.lora:
        new = adapter.lora[module]
        old = out.lora.get(module)
        if old is None:
            out.lora[module] = new
        else:  # two LoRAs on one layer add up: one LoRA of both ranks, each scaling folded into its B
            out.lora[module] = LoraModule(
                a=torch.cat([old.a, new.a]), b=torch.cat([old.b * old.scaling, new.b * new.scaling], dim=1), scaling=1.0
            )
