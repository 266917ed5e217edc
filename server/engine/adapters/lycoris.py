"""LoHa and LoKr (the LyCORIS kinds): structured deltas folded once, at load, into the LoRA pool.

LoHa's delta is a Hadamard product, `ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha/r`; LoKr's a Kronecker product,
`ΔW = (w1 ⊗ w2) · alpha/r`, each factor whole or itself a product of two. Both are exactly a LoRA:

    (B1 A1) ⊙ (B2 A2) = [b1_i ⊙ b2_j]_(i,j) · [a1_i ⊙ a2_j]_(i,j)     rank r1·r2
    (B1 A1) ⊗ (B2 A2) = (B1 ⊗ B2) · (A1 ⊗ A2)                          rank r1·r2

so a row costs what a LoRA row of that rank costs, and the adapter is held once in the pool. Where that rank
reaches min(out, in) the delta is stored whole instead (`low_rank`). Dropouts are off at inference
(docs/adapters.md, "LoHa and LoKr").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.adapters.base import (
    AdapterError,
    LoadedAdapter,
    LoraModule,
    Placement,
    is_empty,
    low_rank,
    module_tensors,
    pattern_value,
    rank_and_alpha,
    refuse_unless,
    register,
    require_layer_task,
    require_tensors,
)
from server.engine.backbone import Geometry

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass(frozen=True)
class LycorisConfig:
    r: int
    alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        """alpha / r, each from its per-module pattern when one matches (PEFT: `self.scaling = alpha / r`)."""
        return pattern_value(self.alpha_pattern, module, self.alpha) / pattern_value(self.rank_pattern, module, self.r)


def fold_loha(module: str, part: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' = (w1_a w1_b) ⊙ (w2_a w2_b)."""
    require_tensors(module, part, _LOHA)
    b1, a1, b2, a2 = (part[name] for name in _LOHA)  # [out, r], [r, in], [out, r], [r, in]
    if not b1.shape[1] == a1.shape[0] == b2.shape[1] == a2.shape[0] or b1.shape != b2.shape:
        raise AdapterError(f"LoHa module {module!r}: the hada_w1 and hada_w2 factors do not chain")
    b = (b1[:, :, None] * b2[:, None, :]).flatten(1)  # [out, r*r]: column (i, j) = b1_i ⊙ b2_j
    a = (a1[:, None, :] * a2[None, :, :]).flatten(0, 1)  # [r*r, in]: row (i, j) = a1_i ⊙ a2_j
    return b, a


def fold_lokr(module: str, part: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' = w1 ⊗ w2."""
    b1, a1 = _factors(module, part, "lokr_w1")
    b2, a2 = _factors(module, part, "lokr_w2")
    return torch.kron(b1, b2), torch.kron(a1, a2)  # [out, r1*r2], [r1*r2, in]


def _factors(module: str, part: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A = the factor `name` of a LoKr module: its two halves, or the whole one beside an identity."""
    if name in part:
        if f"{name}_a" in part or f"{name}_b" in part:
            raise AdapterError(f"LoKr module {module!r} holds both {name} and its halves")
        whole = part[name]  # [o, i]
        if whole.dim() != 2:
            raise AdapterError(f"tensor {module}.{name} has shape {list(whole.shape)}; only linear layers are served")
        rows, cols = whole.shape
        return (whole, torch.eye(cols)) if cols <= rows else (torch.eye(rows), whole)
    require_tensors(module, part, (f"{name}_a", f"{name}_b"))
    b, a = part[f"{name}_a"], part[f"{name}_b"]  # [o, r], [r, i]
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise AdapterError(
            f"LoKr module {module!r}: {name}_a {list(b.shape)} and {name}_b {list(a.shape)} do not chain"
        )
    return b, a


@dataclass(frozen=True)
class LycorisKind:
    """A LyCORIS kind: its tensors, and how a module's tensors fold into LoRA factors (B', A')."""

    kinds: tuple[str, ...]
    name: str
    suffixes: tuple[str, ...]
    fold: Callable[[str, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]

    def parse_config(self, raw: Mapping[str, Any]) -> LycorisConfig:
        require_layer_task(raw)
        refuse_unless(raw, "modules_to_save", is_empty, "full module copies are not served")
        r, alpha = rank_and_alpha(raw, "alpha")
        return LycorisConfig(
            r=r,
            alpha=alpha,
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        )

    def load(
        self,
        key: str,
        config: LycorisConfig,
        tensors: Mapping[str, torch.Tensor],
        geometry: Geometry,
        placement: Placement,
    ) -> LoadedAdapter:
        lora = {}
        for module, part in module_tensors(tensors, self.suffixes, geometry, self.name).items():
            b, a = self.fold(module, part)
            shape = geometry.linear_modules[module]
            got, want = (b.shape[0], a.shape[1]), (shape.out_features, shape.in_features)
            if got != want:
                raise AdapterError(f"{self.name} module {module!r}: the delta is {list(got)}, the layer {list(want)}")
            a, b = low_rank(b, a)
            lora[module] = LoraModule(a=a, b=b, scaling=config.scaling(module))
        return LoadedAdapter(key=key, kind=self.kinds[0], lora=lora)


register(LycorisKind(("loha",), "LoHa", _LOHA, fold_loha))
register(LycorisKind(("lokr",), "LoKr", _LOKR, fold_lokr))
