"""What every adapter kind turns PEFT's saved files into: one `LoadedAdapter`.

A kind's loader is a registered pair: a typed config parsed from `adapter_config.json`
at the edge, and a loader that converts the saved tensors into inference
tensors once. Nothing from PEFT travels further into the engine. Which kinds exist, and the
`peft_type` values each covers, is the store's table (`adapters_store.kinds`): a loader registers
against a kind's name there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from adapters_store import AdapterKey, kinds
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
class VeraBasis:
    """VeRA's frozen random projections, shared by every layer of an adapter (each takes its top-left corner)."""

    key: str  # a hash of the content: adapters with the same projections share one copy in the pool
    a: torch.Tensor  # [r, largest in_features]
    b: torch.Tensor  # [largest out_features, r]


@dataclass(frozen=True)
class VeraModule:
    basis: VeraBasis
    lambda_d: torch.Tensor  # [r]
    lambda_b: torch.Tensor  # [out_features]


@dataclass(frozen=True)
class AdaptionModule:
    """LLaMA-Adapter in one attention layer: its prompt's keys and values (projected once) and its gate."""

    keys: torch.Tensor  # [kv_heads, adapter_len, head_dim], the model's dtype, no RoPE
    values: torch.Tensor  # [kv_heads, adapter_len, head_dim]
    gate: torch.Tensor  # [1]


VECTOR_SIDES = ("scale_in", "scale_out", "shift_out")  # the per-layer vectors, in `LoadedAdapter` and `PoolSlots`


@dataclass(frozen=True)
class PoolSlots:
    """Where a resident adapter's per-layer weights sit in the device pool: family -> slot."""

    lora: dict[str, int] = field(default_factory=dict)
    scale_in: dict[str, int] = field(default_factory=dict)
    scale_out: dict[str, int] = field(default_factory=dict)
    shift_out: dict[str, int] = field(default_factory=dict)
    vera: dict[str, tuple[str, int]] = field(default_factory=dict)  # family -> (basis key, slot)


@dataclass
class LoadedAdapter:
    """One task version's parameters on the device, in the form the engine applies them.

    Prefill-only parts shape how a row starts; per-step parts are read by the
    patched linear layers at every forward. Every per-layer kind is one form:

        y = base(x * scale_in) * scale_out + shift_out + sum of LoRA terms  s * B (A x)

    (IA³: a scale; DoRA: a scale, a shift and a LoRA; LoRA biases and trained base biases: a shift), plus VeRA's
    `lambda_b * B (lambda_d * A x)` over projections shared across layers and adapters.
    """

    key: AdapterKey  # immutable identity (task, version); caches key on it
    kind: str
    soft_prompt: torch.Tensor | None = None  # [virtual_tokens, hidden]
    prefix_kv: torch.Tensor | None = None  # [layers, 2, kv_heads, virtual_tokens, head_dim]
    # per-step weights by module name, parsed on the host; `AdapterPool.install` moves them into `slots`
    lora: dict[str, LoraModule] = field(default_factory=dict)
    scale_in: dict[str, torch.Tensor] = field(default_factory=dict)  # [in_features]
    scale_out: dict[str, torch.Tensor] = field(default_factory=dict)  # [out_features]
    shift_out: dict[str, torch.Tensor] = field(default_factory=dict)  # [out_features]
    vera: dict[str, VeraModule] = field(default_factory=dict)
    adaption: dict[str, AdaptionModule] = field(default_factory=dict)  # by attention module name
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
    def has_layer_weights(self) -> bool:
        """Whether per-layer weights are still held here, on the host, rather than in the pool."""
        return bool(self.lora or self.vera or any(getattr(self, side) for side in VECTOR_SIDES))

    @property
    def layer_weights(self) -> bool:
        """Whether it has per-layer weights (LoRA family, IA³), pooled or not: what adapter_scale weights."""
        return self.has_layer_weights or self.slots is not None

    @property
    def per_step(self) -> bool:
        """Whether every forward must apply this adapter (LoRA family, IA³, LLaMA-Adapter), not only the prefill."""
        return self.has_layer_weights or self.slots is not None or bool(self.adaption)

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [t for t in (self.soft_prompt, self.prefix_kv) if t is not None]
        tensors += [t for m in self.lora.values() for t in (m.a, m.b)]
        tensors += [t for m in self.vera.values() for t in (m.lambda_d, m.lambda_b)]
        tensors += [t for m in self.adaption.values() for t in (m.keys, m.values, m.gate)]
        tensors += [
            t for basis in {m.basis.key: m.basis for m in self.vera.values()}.values() for t in (basis.a, basis.b)
        ]
        return tensors + [t for side in VECTOR_SIDES for t in getattr(self, side).values()]

    @property
    def nbytes(self) -> int:
        return self.pooled_bytes + sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self._tensors())


@dataclass(frozen=True)
class Placement:
    """Where loaded tensors go."""

    device: torch.device
    dtype: torch.dtype  # the backbone's dtype; LoRA and IA³ stay fp32 as PEFT upcasts them
    # the backbone's frozen linear layer by module name -> (weight [out, in], bias [out] or None): DoRA's norm
    # and trained biases are relative to it
    base_linear: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]] | None = None


class AdapterKind(Protocol):
    """A registered kind's loader: parse the config, then load the tensors."""

    kinds: tuple[str, ...]  # names in `adapters_store.kinds.KINDS` this loader serves

    def parse_config(self, raw: Mapping[str, Any]) -> Any: ...

    def load(
        self,
        key: AdapterKey,
        config: Any,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter: ...


LOADERS: dict[str, AdapterKind] = {}  # kind name -> its loader


def register(loader: AdapterKind) -> AdapterKind:
    for name in loader.kinds:
        kind = kinds.by_name(name)
        if kind is None or not kind.peft_types:
            raise ValueError(f"{name!r} is not a PEFT kind of adapters_store.kinds; add it to the table first")
        LOADERS[name] = loader
    return loader


def loader_for(peft_type: object) -> AdapterKind:
    """The loader for an adapter_config.json's `peft_type`; refuses a type no kind covers."""
    kind = kinds.by_peft_type(peft_type)
    if kind is None:
        served = ", ".join(kinds.served_peft_types())
        raise AdapterError(f"adapter_config.json: peft_type={peft_type!r} is not served (served: {served})")
    return LOADERS[kind.name]


def check_loaders() -> None:
    """Every PEFT kind of the table has a loader (run once the kinds' modules are imported)."""
    missing = [kind.name for kind in kinds.KINDS if kind.peft_types and kind.name not in LOADERS]
    if missing:
        raise ImportError(f"adapters_store.kinds lists kinds the engine cannot load: {missing}")


# --- helpers shared by the kinds -------------------------------------------------------------


def refuse_unless(raw: Mapping[str, Any], name: str, ok: Callable[[Any], bool], advice: str) -> None:
    """Refuse a config whose field `name` is set to something we do not serve."""
    if name in raw and not ok(raw[name]):
        raise AdapterError(f"adapter_config.json: {name}={raw[name]!r} is not supported; {advice}")


def require_layer_task(raw: Mapping[str, Any]) -> None:
    """Per-layer kinds apply to any causal LM whatever task_type says, but never to another task's model."""
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"adapter_config.json: task_type={raw['task_type']!r}; only CAUSAL_LM is served")


def rank_and_alpha(raw: Mapping[str, Any], alpha_field: str) -> tuple[int, float]:
    """`r` and its alpha (`lora_alpha`, or LyCORIS's `alpha`), with PEFT's defaults of 8."""
    r, alpha = raw.get("r", 8), raw.get(alpha_field, 8)
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
        raise AdapterError(f"adapter_config.json: r={r!r} and {alpha_field}={alpha!r} must be positive numbers")
    return r, float(alpha)


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
        "modules_to_save copies and other extra tensors are not served"
    )


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key for `rank_pattern` / `alpha_pattern`: the first pattern matching a dotted suffix of
    the module name wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def module_tensors(
    tensors: Mapping[str, torch.Tensor], suffixes: tuple[str, ...], geometry: Geometry, what: str
) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {suffix: tensor} for a per-layer kind; refuses unknown keys, NaN/Inf and non-linear targets."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in sorted(tensors.items()):
        module, suffix = split_module_key(name, suffixes)
        check_finite(name, tensor)
        if module not in geometry.linear_modules:
            raise AdapterError(f"{what} targets {module!r}, which is not a linear layer of this backbone")
        parts.setdefault(module, {})[suffix] = tensor.to(torch.float32)  # PEFT runs adapters in fp32
    if not parts:
        raise AdapterError(f"adapter_model.safetensors holds no {what} tensors")
    return parts


def require_tensors(module: str, part: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in part]
    if missing:
        raise AdapterError(f"module {module!r} lacks {missing}")


def low_rank(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for the delta `b @ a` in the LoRA pool: as given, or dense when that is no larger.

    b [out, k], a [k, in]. Once k reaches min(out, in) the factors are no cheaper than the delta itself, so the delta
    is stored whole, as an identity times it (rank min(out, in)).
    """
    out_features, in_features = b.shape[0], a.shape[1]
    if b.shape[1] < min(out_features, in_features):
        return a, b
    delta = b @ a  # [out, in]
    if out_features <= in_features:
        return delta, torch.eye(out_features)
    return torch.eye(in_features), delta
