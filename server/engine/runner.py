"""One forward pass of the frozen backbone over a batch, with per-row adapters applied."""

from __future__ import annotations

import torch

from server.engine.adapters.batched import LORA_BACKENDS, AdapterBatchData, AdapterHooks
from server.engine.backbone import Backbone
from server.engine.kv_cache import KVCache


class ModelRunner:
    """Owns the hooks on the backbone and turns batch tensors into last-token logits."""

    def __init__(self, backbone: Backbone, lora_backend: str = "bmm"):
        self.backbone = backbone
        self.device = backbone.device
        self.hooks = AdapterHooks(backbone.model, list(backbone.geometry.linear_modules), LORA_BACKENDS[lora_backend]())

    def empty_cache(self, *, batch: int, capacity: int) -> KVCache:
        g = self.backbone.geometry
        return KVCache.empty(
            batch=batch,
            capacity=capacity,
            layers=g.num_layers,
            kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            device=self.device,
            dtype=self.backbone.dtype,
        )

    @torch.inference_mode()
    def prefix_kv(self, token_ids: tuple[int, ...]) -> torch.Tensor:
        """The KV of `token_ids` at positions 0..n-1, base model: [layers, 2, kv_heads, n, head_dim]."""
        n = len(token_ids)
        cache = self.empty_cache(batch=1, capacity=n)
        self.forward(
            input_ids=torch.tensor([token_ids], device=self.device),
            position_ids=torch.arange(n, device=self.device)[None],
            attention_mask=torch.ones(1, n, dtype=torch.long, device=self.device),
            cache=cache,
            adapters=None,
        )
        return torch.stack([torch.stack([layer.keys[0, :, :n], layer.values[0, :, :n]]) for layer in cache.layers])

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, seq] -> input embeddings [batch, seq, hidden], as the model would look them up."""
        return self.backbone.embedding(ids)

    @torch.inference_mode()
    def forward(
        self,
        *,
        position_ids: torch.Tensor,  # [batch, seq]
        attention_mask: torch.Tensor,  # [batch, cached + seq]
        cache: KVCache,
        adapters: AdapterBatchData | None,
        input_ids: torch.Tensor | None = None,  # [batch, seq]
        inputs_embeds: torch.Tensor | None = None,  # [batch, seq, hidden]
    ) -> torch.Tensor:
        """Logits of each row's last position, [batch, vocab] fp32; the cache grows by `seq` columns."""
        with self.hooks.active(adapters):
            out = self.backbone.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask=attention_mask,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float()
