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
from server.engine.grammar import mask_logits
from server.engine.request import TokenLogprob
from server.engine.sampling import sample
from server.engine.scheduler import StepPlan


@dataclass(frozen=True)
class RunnerOutput:
    """What one step produced: a token for each row that sampled, in `rows` order."""

    rows: tuple[Generation, ...]
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob | None, ...]  # per row; None where the request did not ask
    # rows that asked for prompt log-probabilities and scored some prompt tokens this step, in prompt order
    prompt_logprobs: tuple[tuple[Generation, list[TokenLogprob]], ...] = ()


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
        keep = inputs.sample_index
        if inputs.score_index is not None:
            keep = torch.cat([keep, inputs.score_index])
        logits = self.forward(inputs, keep)  # [sampled + scored, vocab] fp32
        rows = inputs.sampled
        logits, score_logits = logits[: len(rows)], logits[len(rows) :]
        # as in vLLM, a grammar's mask comes first: a constrained row's log-probabilities are of what it may emit
        logits = mask_logits(logits, [r.matcher for r in rows])
        tokens = sample(logits, [r.sampling for r in rows], [r.generator for r in rows], [r.history for r in rows])
        return RunnerOutput(
            rows=rows,
            tokens=tuple(tokens.tolist()),
            logprobs=_logprobs(logits, rows, tokens),
            prompt_logprobs=_prompt_logprobs(score_logits, inputs),
        )

    def forward(self, inputs: StepInputs, keep: torch.Tensor) -> torch.Tensor:
        """Logits [kept, vocab] fp32 at the packed inputs `keep` [kept]; every row's new KV is written."""
        embeds = self.backbone.embedding(inputs.token_ids)  # [tokens, hidden]
        if inputs.soft_index is not None:
            embeds.index_copy_(0, inputs.soft_index, inputs.soft_embeds.to(embeds.dtype))
        with self.hooks.active(inputs.adapters):
            out = self.backbone.model(
                inputs_embeds=embeds[None],
                position_ids=inputs.positions[None],
                use_cache=False,
                logits_to_keep=keep,
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
    if wanted:
        index = torch.tensor(wanted, device=logits.device)
        scored = token_logprobs(
            logits.index_select(0, index), tokens.index_select(0, index), [rows[i].sampling.logprobs for i in wanted]
        )
        for i, logprob in zip(wanted, scored):
            out[i] = logprob
    return tuple(out)


def _prompt_logprobs(logits: torch.Tensor, inputs: StepInputs) -> tuple[tuple[Generation, list[TokenLogprob]], ...]:
    """Each scored row's prompt tokens of this step with their log-probabilities (logits [scored tokens, vocab])."""
    if inputs.score_targets is None:
        return ()
    tops = [row.sampling.prompt_logprobs for row, n in inputs.scored for _ in range(n)]
    scored = token_logprobs(logits, inputs.score_targets, tops)
    out, start = [], 0
    for row, n in inputs.scored:
        out.append((row, scored[start : start + n]))
        start += n
    return tuple(out)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[TokenLogprob]:
    """logits [m, vocab] fp32, tokens [m] -> each token's log-probability under its row of logits, with that
    row's `tops[i]` most likely tokens: one log_softmax and one topk for all m rows."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [m, vocab]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()  # [m]
    k = max(tops, default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())  # [m, k]
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(token=token, logprob=chosen[j], top=tuple(zip(top_ids[j][:n], top_values[j][:n])))
        for j, (token, n) in enumerate(zip(tokens.tolist(), tops))
    ]
