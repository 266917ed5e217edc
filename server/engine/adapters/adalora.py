"""AdaLoRA: LoRA in SVD form, `y = base(x) + B ((A * E) x) * lora_alpha / (init_r + 1e-5)`, served as LoRA.

PEFT saves each module's triplet already cut to the ranks its final mask kept (`rank_pattern` lists
the mask per module), so the kept rank is the tensors' own. The singular values fold into A once;
the scaling keeps PEFT's `ranknum`, which stays `init_r` whatever rank was kept (docs/adapters.md,
"AdaLoRA").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.adapters.base import (
    AdapterError,
    LoadedAdapter,
    LoraModule,
    Placement,
    check_shape,
    is_empty,
    module_tensors,
    refuse_unless,
    register,
    require_int,
    require_layer_task,
    require_tensors,
)
from server.engine.adapters.lora import UNSERVED
from server.engine.backbone import Geometry

_TRIPLET = ("lora_A", "lora_E", "lora_B")
_UNSERVED = {
    **UNSERVED,
    "use_dora": "DoRA is not served with AdaLoRA",
    "lora_bias": "a lora_B bias is not served with AdaLoRA",
    "bias": "trained biases are not served with AdaLoRA; retrain with bias='none'",
}


@dataclass(frozen=True)
class AdaLoraConfig:
    init_r: int
    lora_alpha: float
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)  # "<module>.lora_E" -> the kept ranks

    def kept_rank(self, module: str) -> int:
        mask = self.rank_pattern.get(f"{module}.lora_E")
        return self.init_r if mask is None else sum(bool(kept) for kept in mask)

    def scaling(self, module: str) -> float:
        """PEFT's `scaling / ranknum`: alpha (or the rank when alpha <= 0) over `init_r + 1e-5` in fp32."""
        alpha = self.lora_alpha if self.lora_alpha > 0 else float(self.kept_rank(module))
        return alpha / float(torch.tensor(float(self.init_r)) + 1e-5)


class AdaLoraKind:
    kinds = ("adalora",)

    def parse_config(self, raw: Mapping[str, Any]) -> AdaLoraConfig:
        require_layer_task(raw)
        for name, advice in _UNSERVED.items():
            refuse_unless(raw, name, is_empty, advice)
        alpha = raw.get("lora_alpha", 8)
        pattern = raw.get("rank_pattern") or {}
        if not isinstance(alpha, int | float) or not isinstance(pattern, dict):
            raise AdapterError("adapter_config.json: lora_alpha must be a number and rank_pattern an object")
        if not all(isinstance(mask, list) for mask in pattern.values()):
            raise AdapterError("adapter_config.json: AdaLoRA's rank_pattern maps each module to its list of kept ranks")
        return AdaLoraConfig(init_r=require_int(raw, "init_r"), lora_alpha=float(alpha), rank_pattern=pattern)

    def load(
        self,
        key: str,
        config: AdaLoraConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        lora = {}
        for module, part in module_tensors(tensors, _TRIPLET, geometry, "AdaLoRA").items():
            require_tensors(module, part, _TRIPLET)
            shape, rank = geometry.linear_modules[module], config.kept_rank(module)
            check_shape(f"{module}.lora_A", part["lora_A"], (rank, shape.in_features), "[kept rank, in_features]")
            check_shape(f"{module}.lora_E", part["lora_E"], (rank, 1), "[kept rank, 1]")
            check_shape(f"{module}.lora_B", part["lora_B"], (shape.out_features, rank), "[out_features, kept rank]")
            if rank:  # a module whose every rank was pruned adds nothing
                a = part["lora_A"] * part["lora_E"]  # [rank, in]: the singular values folded in
                lora[module] = LoraModule(a=a, b=part["lora_B"], scaling=config.scaling(module))
        return LoadedAdapter(key=key, kind="adalora", lora=lora)


register(AdaLoraKind())
