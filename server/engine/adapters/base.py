"""What every adapter kind turns PEFT's saved files into: one `LoadedAdapter`.

A kind is a registered pair: a typed config parsed from `adapter_config.json`
at the edge, and a loader that converts the saved tensors into inference
tensors once. Nothing from PEFT travels further into the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from adapters_store import AdapterKey
from server.engine.backbone import Geometry

MODULE_PREFIX = "base_model.model."  # PEFT's wrapper prefix on injected-layer keys


class AdapterError(ValueError):
    """An adapter we refuse to serve; the message names the offending field or tensor."""


@dataclass(frozen=True)
class LoraModule:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scaling: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) for rsLoRA


@dataclass(frozen=True)
class Ia3Module:
    vector: torch.Tensor  # [in_features] if on_input else [out_features]
    on_input: bool  # feed-forward modules scale the layer's input, the others its output


@dataclass(frozen=True)
class PoolSlots:
    """Where a resident adapter's per-layer weights sit in the device pool: family -> slot."""

    lora: dict[str, int] = field(default_factory=dict)
    ia3_in: dict[str, int] = field(default_factory=dict)
    ia3_out: dict[str, int] = field(default_factory=dict)


@dataclass
class LoadedAdapter:
    """One task version's parameters on the device, in the form the engine applies them.

    Prefill-only parts shape how a row starts; per-step parts are read by the
    patched linear layers at every forward.
    """

    key: AdapterKey  # immutable identity (task, version); caches key on it
    kind: str
    soft_prompt: torch.Tensor | None = None  # [virtual_tokens, hidden]
    prefix_kv: torch.Tensor | None = None  # [layers, 2, kv_heads, virtual_tokens, head_dim]
    # per-step weights, parsed on the host; `AdapterPool.install` moves them into `slots` on the device
    lora: dict[str, LoraModule] = field(default_factory=dict)  # by module name
    ia3: dict[str, Ia3Module] = field(default_factory=dict)  # by module name
    slots: PoolSlots | None = None
    pooled_bytes: int = 0  # the per-step weights' bytes, once they live in the pool
    # template tasks: the fixed leading tokens, whose KV the engine computes once into `prefix_kv`
    template: Any = None  # adapters_store.format.Template: how a request's input is rendered
    template_ids: tuple[int, ...] = ()

    @property
    def needs_template_kv(self) -> bool:
        return bool(self.template_ids) and self.prefix_kv is None

    @property
    def soft_len(self) -> int:
        return 0 if self.soft_prompt is None else self.soft_prompt.shape[0]

    @property
    def prefix_len(self) -> int:
        return len(self.template_ids) if self.prefix_kv is None else self.prefix_kv.shape[3]

    @property
    def per_step(self) -> bool:
        """Whether every forward must apply this adapter (LoRA, IA³), not only the prefill."""
        return bool(self.lora or self.ia3 or self.slots)

    @property
    def nbytes(self) -> int:
        tensors = [self.soft_prompt, self.prefix_kv]
        tensors += [t for m in self.lora.values() for t in (m.a, m.b)]
        tensors += [m.vector for m in self.ia3.values()]
        return self.pooled_bytes + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def parameters(self) -> int:
        tensors = [self.soft_prompt, self.prefix_kv]
        tensors += [t for m in self.lora.values() for t in (m.a, m.b)]
        tensors += [m.vector for m in self.ia3.values()]
        return sum(t.numel() for t in tensors if t is not None)


@dataclass(frozen=True)
class Placement:
    """Where loaded tensors go."""

    device: torch.device
    dtype: torch.dtype  # the backbone's dtype; LoRA and IA³ stay fp32 as PEFT upcasts them


class AdapterKind(Protocol):
    """A registered adapter kind: parse the config, then load the tensors."""

    peft_types: tuple[str, ...]

    def parse_config(self, raw: Mapping[str, Any]) -> Any: ...

    def load(
        self,
        key: AdapterKey,
        config: Any,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter: ...


KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    for peft_type in kind.peft_types:
        KINDS[peft_type] = kind
    return kind


# --- helpers shared by the kinds -------------------------------------------------------------


def refuse_unless(raw: Mapping[str, Any], name: str, ok: Callable[[Any], bool], advice: str) -> None:
    """Refuse a config whose field `name` is set to something we do not serve."""
    if name in raw and not ok(raw[name]):
        raise AdapterError(f"adapter_config.json: {name}={raw[name]!r} is not supported; {advice}")


def is_empty(value: Any) -> bool:
    return value in (None, False, "", [], {}, "none")


def require_int(raw: Mapping[str, Any], name: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(f"adapter_config.json: {name} must be a positive integer, got {value!r}")
    return value


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdapterError(f"tensor {name} has dtype {tensor.dtype}; adapter weights must be floating point")
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"tensor {name} contains NaN or Inf")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], why: str) -> None:
    if tuple(tensor.shape) != expected:
        raise AdapterError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(expected)} ({why})")


def split_module_key(key: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """'base_model.model.<module>.<suffix>' -> (module, suffix); refuses keys we do not know."""
    for suffix in suffixes:
        if key.startswith(MODULE_PREFIX) and key.endswith("." + suffix):
            return key[len(MODULE_PREFIX) : -len(suffix) - 1], suffix
    raise AdapterError(
        f"tensor {key!r} is not one we serve (expected '{MODULE_PREFIX}<module>.' + one of {list(suffixes)}); "
        "DoRA magnitudes, modules_to_save copies and trained biases are not supported"
    )
