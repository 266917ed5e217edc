"""Prefix tuning: per-layer keys and values placed in the KV cache before the input.

PEFT saves the final KV (after the MLP reparametrisation, if any) as one flat
`[virtual_tokens, layers * 2 * kv_heads * head_dim]` matrix, sized per *KV*
head under GQA. The keys are used raw: RoPE is never applied to them
(docs/adapters.md, "Prefix tuning").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.adapters.base import (
    AdapterError,
    LoadedAdapter,
    Placement,
    check_shape,
    register,
    require_int,
)
from server.engine.adapters.prompt import only_tensor, require_causal_lm
from server.engine.backbone import Geometry


@dataclass(frozen=True)
class PrefixConfig:
    num_virtual_tokens: int
    num_layers: int
    token_dim: int  # kv_heads * head_dim after PEFT's GQA override
    num_attention_heads: int  # the KV-head count after PEFT's GQA override


class PrefixKind:
    kinds = ("prefix_tuning",)

    def parse_config(self, raw: Mapping[str, Any]) -> PrefixConfig:
        require_causal_lm(raw)
        return PrefixConfig(
            num_virtual_tokens=require_int(raw, "num_virtual_tokens"),
            num_layers=require_int(raw, "num_layers"),
            token_dim=require_int(raw, "token_dim"),
            num_attention_heads=require_int(raw, "num_attention_heads"),
        )

    def load(
        self,
        key: str,
        config: PrefixConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        expected = {
            "num_layers": geometry.num_layers,
            "token_dim": geometry.kv_dim,
            "num_attention_heads": geometry.num_kv_heads,
        }
        for name, want in expected.items():
            got = getattr(config, name)
            if got != want:
                raise AdapterError(
                    f"adapter_config.json: {name}={got} but the backbone needs {want} "
                    f"({geometry.num_layers} layers, {geometry.num_kv_heads} KV heads of {geometry.head_dim}); "
                    "this prefix was trained for another model"
                )
        flat = only_tensor(tensors)
        nvt, layers = config.num_virtual_tokens, geometry.num_layers
        kv_heads, head_dim = geometry.num_kv_heads, geometry.head_dim
        check_shape(
            "prompt_embeddings",
            flat,
            (nvt, layers * 2 * geometry.kv_dim),
            "[virtual_tokens, layers*2*kv_dim]",
        )
        # flat index ((layer*2 + k_or_v) * kv_heads + head) * head_dim + d, as PEFT's get_prompt views it
        kv = flat.view(nvt, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
        prefix_kv = kv.contiguous().to(placement.device, placement.dtype)  # [layers, 2, kv_heads, nvt, head_dim]
        return LoadedAdapter(key=key, kind="prefix_tuning", prefix_kv=prefix_kv)


register(PrefixKind())
