"""One forward pass of the frozen backbone over a step's packed rows, then sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from server.engine import attention
from server.engine.adapters.batched import AdapterHooks
from server.engine.adapters.pool import AdapterPool
from server.engine.backbone import Backbone
from server.engine.batch import Batch, StepInputs
from server.engine.generation import Generation
from server.engine.request import TokenLogprob
from server.engine.sampling import sample
from server.engine.scheduler import StepPlan


@dataclass(frozen=True)
class RunnerOutput:
    """What one step produced: a token for each row that sampled, in `rows` order."""

    rows: tuple[Generation, ...]
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob | None, ...]  # per row; None where the request did not ask


class ModelRunner:
    """Owns the backbone's attention and adapter hooks; `execute(plan, batch)` is one step's arithmetic."""

    def __init__(self, backbone: Backbone, pool: AdapterPool):
        self.backbone = backbone
        self.device = backbone.device
        attention.register()
        backbone.model.set_attn_implementation(attention.ATTENTION)
        self.hooks = AdapterHooks(backbone.model, pool)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, batch: Batch) -> RunnerOutput:
        inputs = batch.prepare(plan.chunks)
        logits = self.forward(inputs)  # [sampled, vocab] fp32
        rows = inputs.sampled
        tokens = sample(logits, [r.sampling for r in rows], [r.generator for r in rows])
        return RunnerOutput(rows=rows, tokens=tuple(tokens.tolist()), logprobs=_logprobs(logits, rows, tokens))

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Logits [sampled, vocab] fp32 at the inputs rows sample from; every row's new KV is written."""
        embeds = self.backbone.embedding(inputs.token_ids)  # [tokens, hidden]
        if inputs.soft_index is not None:
            embeds.index_copy_(0, inputs.soft_index, inputs.soft_embeds.to(embeds.dtype))
        with self.hooks.active(inputs.adapters):
            out = self.backbone.model(
                inputs_embeds=embeds[None],
                position_ids=inputs.positions[None],
                use_cache=False,
                logits_to_keep=inputs.sample_index,
                **{attention.PLAN_KWARG: inputs.attention},
            )
        return out.logits[0].float()

    @torch.inference_mode()
    def prefix_kv(self, token_ids: tuple[int, ...]) -> torch.Tensor:
        """The KV of `token_ids` at positions 0..n-1, base model: [layers, 2, kv_heads, n, head_dim]."""
        cache = DynamicCache(config=self.backbone.config)
        self.backbone.model(input_ids=torch.tensor([token_ids], device=self.device), cache=cache, use_cache=True)
        return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])


def _logprobs(logits: torch.Tensor, rows, tokens: torch.Tensor) -> tuple[TokenLogprob | None, ...]:
    """The chosen token's raw log-probability (and the top-k) for the rows that asked."""
    wanted = [i for i, row in enumerate(rows) if row.sampling.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return tuple(out)
    index = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)  # [wanted, vocab]
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])[:, 0].tolist()
    k = max(rows[i].sampling.logprobs for i in wanted)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    for j, i in enumerate(wanted):
        n = rows[i].sampling.logprobs
        top = tuple(zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist()))
        out[i] = TokenLogprob(token=int(tokens[i]), logprob=chosen[j], top=top)
    return tuple(out)
