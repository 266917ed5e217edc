"""One request's life inside the engine: what it feeds the model, how far its KV got, what it made.

A row's input is its adapter's soft prompt (S virtual tokens), its prompt (N tokens), then every
token it generates. Any prefix KV (prefix tuning, a template's leading tokens: P columns) is
already cached before the first input; input i sits at position P + i, whatever shares the batch.
`computed` counts the inputs whose keys and values are in the cache: a row is prefilling until
its S + N prompt inputs are computed, then it decodes, one input per step.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch
from llguidance import LLMatcher

from server.engine.adapters import LoadedAdapter
from server.engine.request import FinishReason, GenerationRequest, TokenDelta, TokenLogprob
from server.engine.residency import Lease
from server.engine.sampling import TokenHistory, make_generator

Sink = Callable[[TokenDelta], None]


def shared_leases(lease: Lease, holders: int) -> list[Lease]:
    """`holders` leases standing for one: the task version stays pinned until the last of them is released."""
    left = [holders]

    def release() -> None:
        left[0] -= 1
        if left[0] == 0:
            lease.release()

    return [Lease(lease.adapter, _release=release) for _ in range(holders)]


_arrivals = itertools.count()  # submission order, for FIFO within a task


class Generation:
    """A request's engine-side state. Touched by the engine thread only, except `cancel`."""

    def __init__(
        self,
        request: GenerationRequest,
        lease: Lease,
        sink: Sink,
        eos_ids: frozenset[int],
        device,
        vocab: int = 0,
        matcher: LLMatcher | None = None,
    ):
        self.request = request
        self.arrival = next(_arrivals)
        self.submitted = time.monotonic()
        self.queue_seconds: float | None = None  # from submission to joining the batch; set on admission
        self.lease = lease  # pins the task version on the device until this row ends
        self.adapter: LoadedAdapter | None = lease.adapter
        self.prompt_ids = request.prompt_ids
        self.sampling = request.sampling
        self.adapter_scale = request.adapter_scale  # per-row data in each step (`AdapterStep.build`)
        self.sink = sink
        self.generator = make_generator(request.sampling, device)
        eos = frozenset() if request.sampling.ignore_eos else eos_ids
        self.end_ids = eos | frozenset(request.sampling.stop_token_ids)  # tokens that end the row ("stop")
        # what logit adjustments read of the row's past (penalties, min_tokens, bias); None when it asks for none
        self.history = (
            TokenHistory(request.sampling, request.prompt_ids, self.end_ids, vocab, device)
            if request.sampling.adjusts_logits
            else None
        )
        self.matcher = matcher  # the row's place in its grammar (structured outputs); None when unconstrained
        self.output_ids: list[int] = []
        self.prompt_logprobs: list[TokenLogprob] = []  # prompt tokens after the first, as prefill scores them
        self.computed = 0  # inputs whose KV is cached
        self.cancelled = False  # set from any thread; read by the engine thread at the next step
        # the KV this row holds while it runs, kept by the Batch
        self.blocks: list[int] = []  # own KV blocks
        self.kv_slots: torch.Tensor | None = None  # [prefix + own capacity] long: the row's KV slots in order
        # n > 1: the other choices, forked from this row once its prompt is computed (they share its prompt's KV)
        self.children: list[Generation] = []
        self.borrowed = 0  # leading inputs whose KV a forked row reads from its parent instead of reserving it
        self.shared_inputs = 0  # leading inputs whose slots lie in shared blocks rather than this row's own
        self.fork_key: str | None = None  # the shared blocks this row holds a reference to

    def cancel(self) -> None:
        self.cancelled = True

    # --- shape ---------------------------------------------------------------------------------------

    @property
    def prefix_len(self) -> int:
        """P: KV columns cached before the first input."""
        return 0 if self.adapter is None else self.adapter.prefix_len

    @property
    def soft_len(self) -> int:
        """S: soft-prompt inputs before the prompt."""
        return 0 if self.adapter is None else self.adapter.soft_len

    @property
    def prompt_inputs(self) -> int:
        return self.soft_len + len(self.prompt_ids)

    @property
    def inputs(self) -> int:
        """Inputs to compute before the next token can be sampled."""
        return self.prompt_inputs + len(self.output_ids)

    @property
    def pending(self) -> int:
        return self.inputs - self.computed

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_inputs

    @property
    def kv_tokens(self) -> int:
        """Own KV columns this row may hold at its longest (the prefix and what it borrows aside)."""
        return self.prompt_inputs - self.borrowed + self.sampling.max_new_tokens

    @property
    def forks(self) -> int:
        """Rows still to fork from this one."""
        return len(self.children)

    @property
    def fork_kv_tokens(self) -> int:
        """Own KV columns each of them may hold: it recomputes the prompt's last input, then generates."""
        return 1 + self.sampling.max_new_tokens

    @property
    def remaining(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)

    def input_ids(self, start: int, end: int) -> list[int]:
        """Token ids of inputs start:end (0 where an input is a soft-prompt vector)."""
        soft, prompt = self.soft_len, len(self.prompt_ids)
        ids = [0] * max(0, min(end, soft) - start)
        lo, hi = max(start, soft) - soft, max(end, soft) - soft
        if lo < prompt:
            ids += self.prompt_ids[lo : min(hi, prompt)]
        if hi > prompt:
            ids += self.output_ids[max(lo, prompt) - prompt : hi - prompt]
        return ids

    # --- output --------------------------------------------------------------------------------------

    def accept(self, token: int, logprob: TokenLogprob | None) -> TokenDelta:
        """Record one sampled token; the delta says whether the row is done.

        The first delta carries the prompt's log-probabilities, when asked. A row that asks for no new tokens
        (it only scores its prompt) ends here without keeping the token.
        """
        first = not self.output_ids
        if self.sampling.max_new_tokens == 0:
            return self._delta(
                [],
                "length",
                prompt_logprobs=self._scored_prompt(),
                prompt_ids=self.prompt_ids,
                queue_seconds=self.queue_seconds,
            )
        self.output_ids.append(token)
        if self.history is not None:
            self.history.add(token)
        reason: FinishReason | None = None
        if token in self.end_ids or self._grammar_done(token):
            reason = "stop"
        elif self.remaining <= 0:
            reason = "length"
        logprobs = None if logprob is None else [logprob]
        if not first:
            return self._delta([token], reason, logprobs=logprobs)
        return self._delta(
            [token],
            reason,
            logprobs=logprobs,
            prompt_logprobs=self._scored_prompt(),
            prompt_ids=self.prompt_ids,
            queue_seconds=self.queue_seconds,
        )

    def _grammar_done(self, token: int) -> bool:
        """Advance the row's grammar by `token`: done once it accepts nothing more (its output is complete)."""
        if self.matcher is None:
            return False
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()

    def _scored_prompt(self) -> list[TokenLogprob | None] | None:
        return None if self.sampling.prompt_logprobs is None else [None, *self.prompt_logprobs]

    def end(self, reason: FinishReason, error: str | None = None) -> None:
        """Close the stream without a token (cancelled, or a fault), and those of the choices not forked yet."""
        for child in self.children:
            child.lease.release()
            child.end(reason, error)
        self.children = []
        self.sink(self._delta([], reason, error=error))

    def _delta(
        self,
        token_ids: list[int],
        reason: FinishReason | None,
        error: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
        prompt_ids: tuple[int, ...] | None = None,
        queue_seconds: float | None = None,
    ) -> TokenDelta:
        return TokenDelta(
            token_ids=token_ids,
            text="",
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            task_version=None if self.adapter is None else self.adapter.key,
            error=error,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            prompt_ids=prompt_ids,
            queue_seconds=queue_seconds,
        )
