"""VeRA: one pair of frozen random projections shared by every adapted layer, and two vectors per layer.

`y = base(x) + lambda_b * B[:out] (lambda_d * A[:, :in] x)`: each layer takes the top-left corner of the
shared `A [r, largest in]` and `B [largest out, r]`. The pool keeps each distinct pair once, however many
layers and adapters use it, and only the vectors per layer and adapter (docs/adapters.md, "VeRA").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.adapters.base import (
    AdapterError,
    LoadedAdapter,
    Placement,
    VeraBasis,
    VeraModule,
    check_finite,
    check_shape,
    is_empty,
    module_tensors,
    refuse_unless,
    register,
    require_int,
    require_layer_task,
    require_tensors,
)
from server.engine.backbone import Geometry

_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")
_VECTORS = ("vera_lambda_d", "vera_lambda_b")


@dataclass(frozen=True)
class VeraConfig:
    r: int


class VeraKind:
    kinds = ("vera",)

    def parse_config(self, raw: Mapping[str, Any]) -> VeraConfig:
        require_layer_task(raw)
        refuse_unless(raw, "modules_to_save", is_empty, "full module copies are not served")
        refuse_unless(raw, "bias", is_empty, "trained biases are not served with VeRA; retrain with bias='none'")
        refuse_unless(
            raw,
            "save_projection",
            lambda v: v is True,
            "the shared projections must be in the file; re-save with save_projection=True",
        )
        return VeraConfig(r=require_int(raw, "r"))

    def load(
        self,
        key: str,
        config: VeraConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        missing = [name for name in _PROJECTIONS if name not in tensors]
        if missing:
            raise AdapterError(f"adapter_model.safetensors lacks {missing}; re-save with save_projection=True")
        a, b = (tensors[name] for name in _PROJECTIONS)
        for name, tensor in zip(_PROJECTIONS, (a, b), strict=True):
            check_finite(name, tensor)
        widest_in = max(s.in_features for s in geometry.linear_modules.values())
        widest_out = max(s.out_features for s in geometry.linear_modules.values())
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.r or b.shape[1] != config.r:
            raise AdapterError(f"vera_A {list(a.shape)} and vera_B {list(b.shape)} must be [r, in] and [out, r]")
        if a.shape[1] > widest_in or b.shape[0] > widest_out:
            raise AdapterError(f"vera_A {list(a.shape)} / vera_B {list(b.shape)} are wider than any layer here")
        a, b = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
        digest = hashlib.sha256(a.numpy().tobytes() + b"|" + b.numpy().tobytes()).hexdigest()[:32]
        basis = VeraBasis(key=f"{config.r}x{a.shape[1]}x{b.shape[0]}:{digest}", a=a, b=b)
        rest = {name: tensor for name, tensor in tensors.items() if name not in _PROJECTIONS}
        vera = {}
        for module, part in module_tensors(rest, _VECTORS, geometry, "VeRA").items():
            require_tensors(module, part, _VECTORS)
            shape = geometry.linear_modules[module]
            if shape.in_features > a.shape[1] or shape.out_features > b.shape[0]:
                raise AdapterError(
                    f"VeRA's projections are narrower than {module} ({shape.in_features} -> {shape.out_features})"
                )
            check_shape(f"{module}.vera_lambda_d", part["vera_lambda_d"], (config.r,), "[r]")
            check_shape(f"{module}.vera_lambda_b", part["vera_lambda_b"], (shape.out_features,), "[out_features]")
            vera[module] = VeraModule(basis=basis, lambda_d=part["vera_lambda_d"], lambda_b=part["vera_lambda_b"])
        return LoadedAdapter(key=key, kind="vera", vera=vera)


register(VeraKind())
