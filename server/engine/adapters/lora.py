"""LoRA: `y = base(x) + B(A x) * scaling` on any adaptable linear layer.

The module names and ranks come from the tensor keys and shapes; the config
supplies `lora_alpha`, rsLoRA and the per-module `rank_pattern` /
`alpha_pattern`. `fan_in_fan_out` changes nothing unmerged: A and B are plain
linear maps whatever the base layout (docs/adapters.md, "LoRA").
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.adapters.base import (
    AdapterError,
    LoadedAdapter,
    LoraModule,
    Placement,
    check_finite,
    check_shape,
    is_empty,
    refuse_unless,
    register,
    split_module_key,
)
from server.engine.backbone import Geometry

# fields whose non-default value changes inference in ways we do not serve
_UNSERVED = {
    "use_dora": "DoRA is not served; merge it or retrain without use_dora",
    "bias": "trained base biases are not served; retrain with bias='none'",
    "lora_bias": "a bias on lora_B is not served; retrain with lora_bias=False",
    "modules_to_save": "full module copies are not served; retrain without modules_to_save",
    "trainable_token_indices": "trainable tokens are not served",
    "layer_replication": "layer replication is not served",
    "target_parameters": "LoRA on nn.Parameter targets is not served",
    "alora_invocation_tokens": "activated LoRA is not served",
    "use_qalora": "QALoRA is not served",
    "use_bdlora": "block-diagonal LoRA is not served",
    "arrow_config": "Arrow routing is not served",
    "megatron_config": "Megatron-parallel LoRA is not served",
}


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def pattern_value(self, patterns: Mapping[str, Any], module: str, default: Any) -> Any:
        """PEFT's get_pattern_key: the first pattern matching a dotted suffix of the module name wins."""
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    def scaling(self, module: str, rank: int) -> float:
        alpha = self.pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


class LoraKind:
    peft_types = ("LORA",)

    def parse_config(self, raw: Mapping[str, Any]) -> LoraConfig:
        if raw.get("task_type") not in (None, "CAUSAL_LM"):
            raise AdapterError(f"adapter_config.json: task_type={raw['task_type']!r}; only CAUSAL_LM is served")
        for name, advice in _UNSERVED.items():
            refuse_unless(raw, name, is_empty, advice)
        r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
            raise AdapterError(f"adapter_config.json: r={r!r} and lora_alpha={alpha!r} must be positive numbers")
        return LoraConfig(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        )

    def load(
        self,
        key: str,
        config: LoraConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for name, tensor in tensors.items():
            module, suffix = split_module_key(name, ("lora_A.weight", "lora_B.weight"))
            check_finite(name, tensor)
            pairs[module][suffix] = tensor
        if not pairs:
            raise AdapterError("adapter_model.safetensors holds no lora_A / lora_B tensors")
        modules = {}
        for module, pair in sorted(pairs.items()):
            shape = geometry.linear_modules.get(module)
            if shape is None:
                raise AdapterError(f"LoRA targets {module!r}, which is not a linear layer of this backbone")
            if set(pair) != {"lora_A.weight", "lora_B.weight"}:
                raise AdapterError(f"LoRA module {module!r} lacks { ({'lora_A.weight', 'lora_B.weight'} - set(pair)) }")
            a, b = pair["lora_A.weight"], pair["lora_B.weight"]
            rank = config.pattern_value(config.rank_pattern, module, config.r)
            check_shape(f"{module}.lora_A.weight", a, (rank, shape.in_features), "[r, in_features]")
            check_shape(f"{module}.lora_B.weight", b, (shape.out_features, rank), "[out_features, r]")
            # PEFT upcasts adapter weights to fp32 and runs the LoRA branch in fp32; host copies until pooled
            modules[module] = LoraModule(
                a=a.to(torch.float32),
                b=b.to(torch.float32),
                scaling=config.scaling(module, rank),
            )
        return LoadedAdapter(key=key, kind="lora", lora=modules)


register(LoraKind())
