"""LoRA: `y = base(x) + B(A x) * scaling` on any adaptable linear layer, with its variants.

The module names and ranks come from the tensor keys and shapes; the config
supplies `lora_alpha`, rsLoRA and the per-module `rank_pattern` /
`alpha_pattern`. `fan_in_fan_out` changes nothing unmerged: A and B are plain
linear maps whatever the base layout (docs/adapters.md, "LoRA").

The variants fold into the per-layer form `base(x) * scale_out + shift_out + s * B'(A x)` once, at load,
since the backbone never changes: DoRA's per-output factor `g = magnitude / ||W + s B A||_row` scales the
base output and B (B' = g B); a `lora_B` bias adds `s * bias`; trained base biases (`bias="lora_only"/"all"`)
replace the backbone's, i.e. add `saved - g * base` (docs/adapters.md, "LoRA variants").
"""

from __future__ import annotations

import math
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
    pattern_value,
    rank_and_alpha,
    refuse_unless,
    register,
    require_layer_task,
    split_module_key,
)
from server.engine.backbone import Geometry

# fields whose non-default value changes inference in ways we do not serve
UNSERVED = {
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
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"  # which base biases were trained and saved: "none", "lora_only" or "all"

    def scaling(self, module: str, rank: int) -> float:
        alpha = pattern_value(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


class LoraKind:
    kinds = ("lora",)

    def parse_config(self, raw: Mapping[str, Any]) -> LoraConfig:
        require_layer_task(raw)
        for name, advice in UNSERVED.items():
            refuse_unless(raw, name, is_empty, advice)
        refuse_unless(raw, "bias", lambda v: v in ("none", "lora_only", "all"), "PEFT saves none, lora_only or all")
        if raw.get("use_dora") and raw.get("lora_bias"):
            raise AdapterError("adapter_config.json: use_dora with lora_bias=True is not a valid PEFT adapter")
        r, alpha = rank_and_alpha(raw, "lora_alpha")
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            use_dora=bool(raw.get("use_dora", False)),
            lora_bias=bool(raw.get("lora_bias", False)),
            bias=raw.get("bias") or "none",
        )

    def load(
        self,
        key: str,
        config: LoraConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        parts = _module_tensors(config, tensors, geometry)
        adapter = LoadedAdapter(key=key, kind="dora" if config.use_dora else "lora")
        for module, part in sorted(parts.items()):
            shape = geometry.linear_modules[module]
            if set(part) == {"bias"}:  # bias="all": the trained bias of a layer LoRA does not target
                _replace_base_bias(adapter, module, part["bias"], torch.ones(shape.out_features), placement)
                continue
            missing = {"lora_A.weight", "lora_B.weight"} - set(part)
            if missing:
                raise AdapterError(f"LoRA module {module!r} lacks {sorted(missing)}")
            a, b = part["lora_A.weight"], part["lora_B.weight"]
            rank = pattern_value(config.rank_pattern, module, config.r)
            check_shape(f"{module}.lora_A.weight", a, (rank, shape.in_features), "[r, in_features]")
            check_shape(f"{module}.lora_B.weight", b, (shape.out_features, rank), "[out_features, r]")
            # PEFT upcasts adapter weights to fp32 and runs the LoRA branch in fp32; host copies until pooled
            a, b, scaling = a.to(torch.float32), b.to(torch.float32), config.scaling(module, rank)
            factor = torch.ones(shape.out_features)
            if config.use_dora:
                factor = _dora_factor(module, part, a, b, scaling, placement)
                adapter.scale_out[module] = factor
                b = b * factor[:, None]
            adapter.lora[module] = LoraModule(a=a, b=b, scaling=scaling)
            if "lora_B.bias" in part:
                check_shape(f"{module}.lora_B.bias", part["lora_B.bias"], (shape.out_features,), "[out_features]")
                adapter.shift_out[module] = part["lora_B.bias"].to(torch.float32) * scaling
            if "bias" in part or (config.use_dora and _base_bias(module, placement) is not None):
                _replace_base_bias(adapter, module, part.get("bias"), factor, placement)
        return adapter


def _module_tensors(config: LoraConfig, tensors: Mapping[str, torch.Tensor], geometry: Geometry) -> dict:
    """module -> {suffix: tensor}, refusing any tensor this config does not explain."""
    suffixes = ["lora_A.weight", "lora_B.weight"]
    suffixes += ["lora_magnitude_vector"] if config.use_dora else []
    suffixes += ["lora_B.bias"] if config.lora_bias else []
    suffixes += ["base_layer.bias", "bias"] if config.bias != "none" else []
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in sorted(tensors.items()):
        module, suffix = split_module_key(name, tuple(suffixes))
        check_finite(name, tensor)
        if module not in geometry.linear_modules:
            if suffix.endswith("bias"):
                raise AdapterError(
                    f"tensor {name}: a trained bias of {module!r}, which is not a linear layer of this backbone "
                    "(bias='all' also trains layer norms' biases, which are not served); retrain with bias='lora_only'"
                )
            raise AdapterError(f"LoRA targets {module!r}, which is not a linear layer of this backbone")
        parts[module]["bias" if suffix.endswith("bias") and suffix != "lora_B.bias" else suffix] = tensor
    if not any("lora_A.weight" in part for part in parts.values()):
        raise AdapterError("adapter_model.safetensors holds no lora_A / lora_B tensors")
    return parts


def _base_bias(module: str, placement: Placement) -> torch.Tensor | None:
    if placement.base_linear is None:
        raise AdapterError("DoRA and trained biases need the backbone's weights, and none were given")
    return placement.base_linear(module)[1]


def _dora_factor(module, part, a, b, scaling: float, placement: Placement) -> torch.Tensor:
    """DoRA's magnitude / ||W + s B A|| per output row: PEFT's norm, detached, of the unmerged weight in fp32."""
    if "lora_magnitude_vector" not in part:
        raise AdapterError(f"DoRA module {module!r} lacks its lora_magnitude_vector")
    magnitude = part["lora_magnitude_vector"].to(torch.float32)
    check_shape(f"{module}.lora_magnitude_vector", magnitude, (b.shape[0],), "[out_features]")
    _base_bias(module, placement)  # refuses a placement without the backbone
    weight = placement.base_linear(module)[0].detach().to("cpu", torch.float32)  # [out, in]
    norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1)  # [out]
    return magnitude / norm


def _replace_base_bias(adapter, module: str, saved, factor: torch.Tensor, placement: Placement) -> None:
    """The layer's output becomes `g * (W x) + saved` instead of `W x + base`: shift by `saved - g * base`."""
    base = _base_bias(module, placement)
    if base is None:
        if saved is not None:
            raise AdapterError(f"tensor for {module}'s bias: this backbone's layer has no bias to replace")
        return
    base = base.detach().to("cpu", torch.float32)
    if saved is not None:
        check_shape(f"{module} bias", saved, tuple(base.shape), "[out_features]")
    shift = (saved.to(torch.float32) if saved is not None else base) - factor * base
    if shift.any():
        adapter.shift_out[module] = shift + adapter.shift_out.get(module, 0)


register(LoraKind())
