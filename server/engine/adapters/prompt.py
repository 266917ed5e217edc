"""Prompt tuning and p-tuning: soft embeddings placed before the input tokens.

PEFT saves p-tuning's encoder *output*, not the encoder, so at inference both
kinds are the same `[virtual_tokens, hidden]` matrix (docs/adapters.md, "Prompt tuning and p-tuning").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from adapters_store import kinds
from server.engine.adapters.base import (
    AdapterError,
    LoadedAdapter,
    Placement,
    check_finite,
    check_shape,
    register,
    require_int,
)
from server.engine.backbone import Geometry


@dataclass(frozen=True)
class SoftPromptConfig:
    peft_type: str
    num_virtual_tokens: int
    token_dim: int


def require_causal_lm(raw: Mapping[str, Any]) -> None:
    """Without task_type CAUSAL_LM, PEFT's plain `PeftModel` ignores prompt-learning entirely."""
    if raw.get("task_type") != "CAUSAL_LM":
        raise AdapterError(
            f"adapter_config.json: task_type={raw.get('task_type')!r}; prompt-learning adapters must be saved "
            "with task_type='CAUSAL_LM' (PEFT itself ignores them otherwise)"
        )


def only_tensor(tensors: Mapping[str, torch.Tensor], name: str = "prompt_embeddings") -> torch.Tensor:
    extra = sorted(set(tensors) - {name})
    if name not in tensors or extra:
        raise AdapterError(f"expected exactly one tensor {name!r}, found {sorted(tensors)}")
    tensor = tensors[name]
    check_finite(name, tensor)
    return tensor


class SoftPromptKind:
    kinds = ("prompt_tuning", "p_tuning")

    def parse_config(self, raw: Mapping[str, Any]) -> SoftPromptConfig:
        require_causal_lm(raw)
        if raw.get("num_transformer_submodules", 1) != 1:
            raise AdapterError("adapter_config.json: num_transformer_submodules must be 1 for a causal LM")
        return SoftPromptConfig(
            peft_type=raw["peft_type"],
            num_virtual_tokens=require_int(raw, "num_virtual_tokens"),
            token_dim=require_int(raw, "token_dim"),
        )

    def load(
        self,
        key: str,
        config: SoftPromptConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        if config.token_dim != geometry.hidden_size:
            raise AdapterError(
                f"adapter_config.json: token_dim={config.token_dim} but the backbone's hidden size is "
                f"{geometry.hidden_size}; this adapter was trained for another model"
            )
        embeddings = only_tensor(tensors)
        check_shape(
            "prompt_embeddings",
            embeddings,
            (config.num_virtual_tokens, geometry.hidden_size),
            "[virtual_tokens, hidden]",
        )
        soft_prompt = embeddings.to(placement.device, placement.dtype)  # PEFT casts to the embeddings' dtype
        kind = kinds.by_peft_type(config.peft_type)
        assert kind is not None  # parse_config ran on a served type
        return LoadedAdapter(key=key, kind=kind.name, soft_prompt=soft_prompt)


register(SoftPromptKind())
