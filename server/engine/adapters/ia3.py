"""IA³: learned vectors that rescale a layer's output, or a feed-forward layer's input.

PEFT saves `ia3_l` as `[out, 1]` for ordinary targets and `[1, in]` for
feed-forward ones; the saved orientation must agree with the config's
`feedforward_modules` (docs/adapters.md, "IA³").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.adapters.base import (
    AdapterError,
    LoadedAdapter,
    Placement,
    check_finite,
    is_empty,
    refuse_unless,
    register,
    require_layer_task,
    split_module_key,
)
from server.engine.backbone import Geometry


@dataclass(frozen=True)
class Ia3Config:
    feedforward_modules: str | tuple[str, ...]

    def is_feedforward(self, module: str) -> bool:
        """PEFT's check: a regex fullmatch for a string, else a plain suffix test per entry."""
        if isinstance(self.feedforward_modules, str):
            return re.fullmatch(self.feedforward_modules, module) is not None
        return any(module.endswith(entry) for entry in self.feedforward_modules)


class Ia3Kind:
    kinds = ("ia3",)

    def parse_config(self, raw: Mapping[str, Any]) -> Ia3Config:
        require_layer_task(raw)
        refuse_unless(raw, "modules_to_save", is_empty, "full module copies are not served")
        ff = raw.get("feedforward_modules") or ()
        return Ia3Config(feedforward_modules=ff if isinstance(ff, str) else tuple(ff))

    def load(
        self,
        key: str,
        config: Ia3Config,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        scale_in, scale_out = {}, {}
        for name, tensor in sorted(tensors.items()):
            module, _ = split_module_key(name, ("ia3_l",))
            check_finite(name, tensor)
            shape = geometry.linear_modules.get(module)
            if shape is None:
                raise AdapterError(f"IA³ targets {module!r}, which is not a linear layer of this backbone")
            feedforward = config.is_feedforward(module)
            expected = (1, shape.in_features) if feedforward else (shape.out_features, 1)
            if tuple(tensor.shape) != expected:
                role = "feed-forward (scales the input)" if feedforward else "non-feed-forward (scales the output)"
                raise AdapterError(
                    f"tensor {name} has shape {list(tensor.shape)}, but {module} is {role} "
                    f"per feedforward_modules, so it must be {list(expected)}"
                )
            (scale_in if feedforward else scale_out)[module] = tensor.flatten().to(torch.float32)
        if not scale_in and not scale_out:
            raise AdapterError("adapter_model.safetensors holds no ia3_l tensors")
        return LoadedAdapter(key=key, kind="ia3", scale_in=scale_in, scale_out=scale_out)


register(Ia3Kind())
