"""Per-architecture facts the engine needs, kept in one place.

Generic code asks this module, never `model_type` directly: how many KV heads a
prefix holds, which linear layers are adaptable, whether a layer stores its
weight transposed (GPT-2's Conv1D, PEFT's `fan_in_fan_out`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """How one family of models lays out what adapters touch."""

    name: str
    # attribute names on the HF config, in order of preference
    kv_heads_attr: str | None  # None: one KV head per query head (no GQA)
    # module classes that PEFT treats as linear layers for LoRA / IA3
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    # GPT-2 stores Conv1D weights as [in, out]: PEFT adapters on it set fan_in_fan_out
    transposed_types: tuple[type[nn.Module], ...] = ()

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        heads = config.num_attention_heads
        if self.kv_heads_attr is None:
            return heads
        return getattr(config, self.kv_heads_attr, None) or heads

    def head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def context_length(self, config: PretrainedConfig) -> int:
        """Tokens a row may span. Sliding-window attention is not served: a window caps the context instead,
        so no key ever falls out of it and full attention is exact."""
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True):
            context = min(context, window)
        return context

    def is_transposed(self, module: nn.Module) -> bool:
        return isinstance(module, self.transposed_types)

    def linear_shape(self, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) whatever the weight layout."""
        if self.is_transposed(module):
            fan_in, fan_out = module.weight.shape
            return fan_in, fan_out
        return module.in_features, module.out_features


_LLAMA_LIKE = Architecture(name="llama", kv_heads_attr="num_key_value_heads")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": Architecture(name="gpt2", kv_heads_attr=None, linear_types=(nn.Linear, Conv1D), transposed_types=(Conv1D,)),
}


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The known architecture, or a llama-like guess (logged) for other decoder-only models."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        log.warning("model_type %r has no tested architecture entry; assuming llama-like layout", config.model_type)
        return Architecture(name=config.model_type, kv_heads_attr="num_key_value_heads")
    return arch
