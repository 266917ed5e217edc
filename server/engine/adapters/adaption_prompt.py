"""LLaMA-Adapter (PEFT's ADAPTION_PROMPT): a gated prompt that the top layers' attention also attends to.

In each adapted layer the queries attend, with a softmax of their own, to `adapter_len` learned prompt vectors
projected by the layer's own k_proj / v_proj (no RoPE on them), the result is scaled by a learned gate and
passed through o_proj, and added to the attention's output: the unified view's gated prefix,
`h ← h + λ·Δh` (docs/adapters.md, "LLaMA-Adapter"). The prompt's keys and values never change, so they
are computed once, at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from server.engine.adapters.base import (
    AdapterError,
    AdaptionModule,
    LoadedAdapter,
    Placement,
    check_finite,
    check_shape,
    register,
    require_int,
    require_layer_task,
    split_module_key,
)
from server.engine.adapters.pool import family_of
from server.engine.backbone import Geometry

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class AdaptionPromptConfig:
    adapter_len: int
    adapter_layers: int


class AdaptionPromptKind:
    kinds = ("adaption_prompt",)

    def parse_config(self, raw: Mapping[str, Any]) -> AdaptionPromptConfig:
        require_layer_task(raw)
        if raw.get("target_modules", "self_attn") != "self_attn":
            raise AdapterError(
                f"adapter_config.json: target_modules={raw['target_modules']!r}; LLaMA-Adapter is served on the "
                "llama family's self_attn"
            )
        return AdaptionPromptConfig(
            adapter_len=require_int(raw, "adapter_len"), adapter_layers=require_int(raw, "adapter_layers")
        )

    def load(
        self,
        key: str,
        config: AdaptionPromptConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in sorted(tensors.items()):
            module, suffix = split_module_key(name, ("adaption_prompt", "adaption_gate"))
            check_finite(name, tensor)
            if any(f"{module}.{p}" not in geometry.linear_modules for p in _PROJECTIONS):
                raise AdapterError(
                    f"LLaMA-Adapter targets {module!r}, which is not an attention with q/k/v/o projections; "
                    "it is served for the llama family"
                )
            parts.setdefault(module, {})[suffix] = tensor
        top = set(range(geometry.num_layers - config.adapter_layers, geometry.num_layers))
        layers = {family_of(module)[1] for module in parts}
        if layers != top:
            raise AdapterError(
                f"adapter_config.json: adapter_layers={config.adapter_layers}, but the tensors adapt layers "
                f"{sorted(layers)} of {geometry.num_layers}; PEFT adapts the top ones"
            )
        if placement.base_linear is None:
            raise AdapterError("LLaMA-Adapter needs the backbone's k_proj and v_proj, and none were given")
        modules = {}
        for module, part in parts.items():
            missing = {"adaption_prompt", "adaption_gate"} - set(part)
            if missing:
                raise AdapterError(f"LLaMA-Adapter module {module!r} lacks {sorted(missing)}")
            shape = (1, config.adapter_len, geometry.hidden_size)
            check_shape(f"{module}.adaption_prompt", part["adaption_prompt"], shape, "[1, adapter_len, hidden]")
            check_shape(f"{module}.adaption_gate", part["adaption_gate"], (1,), "[1]")
            modules[module] = _project(module, part, geometry, placement)
        return LoadedAdapter(key=key, kind="adaption_prompt", adaption=modules)


def _project(module: str, part: Mapping[str, torch.Tensor], geometry: Geometry, placement: Placement) -> AdaptionModule:
    """The prompt's keys and values as PEFT computes them: the layer's k_proj / v_proj in the model's dtype.

    Computed where `placement` says: on the device when serving, on the CPU when validating an upload (the
    projection's weights are copied there), so a validation allocates no device memory."""
    kv = []
    for projection in ("k_proj", "v_proj"):
        weight, bias = placement.base_linear(f"{module}.{projection}")
        weight, bias = weight.to(placement.device), None if bias is None else bias.to(placement.device)
        out = F.linear(part["adaption_prompt"][0].to(weight.device, weight.dtype), weight, bias)  # [len, kv_dim]
        kv.append(out.view(-1, geometry.num_kv_heads, geometry.head_dim).transpose(0, 1).contiguous())
    gate = part["adaption_gate"].to(placement.device, placement.dtype)
    return AdaptionModule(keys=kv[0], values=kv[1], gate=gate)


register(AdaptionPromptKind())
