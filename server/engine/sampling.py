"""Token selection: logit adjustments, greedy, temperature, min-p, top-k and top-p, with per-request seeds.

The hot path is ``sample``: when no row adjusts its logits and every row is greedy it is one ``argmax``.
Rows that adjust (logit bias, min_tokens, repetition/frequency/presence penalties, in vLLM's order) are
adjusted together, each from its ``TokenHistory`` kept on the device; sampling rows are filtered together,
then each is drawn with its own generator, so a seeded request produces the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from server.engine.grammar import Constraint

MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 100.0
# Below these, softmax(logits / temperature) and the top-p cut lose all precision: treated as these (as vLLM does).
MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-8
MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as in OpenAI's API
MAX_REPETITION_PENALTY = 100.0  # past it a seen token's logit is as good as ruled out
MAX_LOGIT_BIAS = 100.0
SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts unsigned 64-bit seeds

# Reads every row's temperature in C (map + attrgetter): an all-greedy batch, the hot path,
# is recognised without running Python bytecode per row.
_temperature = attrgetter("temperature")


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of token selection and stopping."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens, EOS and stop strings aside; 0 scores the prompt and generates nothing."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with mass >= top_p; 1 turns it off."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns it off."""
    seed: int | None = None
    """Same seed + same prompt + same task -> same tokens, whatever shares the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched on detokenised text; the output ends just before the first one."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """Return each sampled token's log-probability and this many most likely alternatives (0-20); None: no."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (from the prefill's logits); None: no."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI's semantics), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides a positive logit (multiplies a negative one) of every token in the prompt or output; 1 is off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (after temperature); 0 is off."""
    min_tokens: int = 0
    """EOS and stop_token_ids are ruled out until this many tokens are generated."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the generation like EOS (finish_reason "stop"), even with ignore_eos."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token, bias) pairs added to the logits, bias in [-100, 100]."""
    include_stop_str_in_output: bool = False
    """Keep the stop string (or stop token's text) that ended the output in its text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    n: int = 1
    """Choices for this prompt: rows that share its prefill, each sampling its own tokens (seed + i for the i-th)."""
    constraint: Constraint | None = None
    """A grammar the output must match (structured outputs): each row masks its logits from a matcher of its own."""

    def __post_init__(self) -> None:
        # Normalise a list of stops to a tuple so the params stay hashable; a bare str would
        # silently become one stop string per character, so it is refused.
        if isinstance(self.stop, str):
            raise ValueError("stop must be a sequence of strings, not a single str")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple(tuple(pair) for pair in self.logit_bias))
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:  # also rejects NaN and infinities
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens}")
        if any(not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS for _, bias in self.logit_bias):
            raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")

    @property
    def is_greedy(self) -> bool:
        """Greedy rows skip filtering and need no generator."""
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling changes this row's logits before choosing (and so needs its TokenHistory)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_tokens
            or self.logit_bias
        )


class TokenHistory:
    """What a row's logit adjustments read of its past, kept on the device and updated one token a step (never
    rebuilt from lists): generated-token counts (frequency, presence), prompt-or-output marks (repetition),
    and the ids min_tokens holds back."""

    def __init__(self, params: SamplingParams, prompt_ids, end_ids, vocab: int, device: torch.device):
        self.params = params
        self.generated = 0
        self.counts = None  # [vocab] fp32: times each token was generated
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen = None  # [vocab] bool: in the prompt or generated
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        self.held_back = sorted(end_ids) if params.min_tokens else []  # EOS and stop_token_ids

    def add(self, token: int) -> None:
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    @property
    def banned(self) -> list[int]:
        """Ids ruled out at the next step: the end ids, while min_tokens is not reached."""
        return self.held_back if self.generated < self.params.min_tokens else []


def adjust_logits(logits: torch.Tensor, histories: Sequence[TokenHistory | None]) -> torch.Tensor:
    """logits [batch, vocab] fp32 -> a new tensor with each row's bias, min_tokens and penalties applied, in
    vLLM's order; rows without a history are left as they are. The rows that adjust are handled together:
    the Python work per row is its bias entries and banned ids, never its vocabulary."""
    rows = [i for i, h in enumerate(histories) if h is not None]
    if not rows:
        return logits
    picked = [histories[i] for i in rows]
    device, vocab = logits.device, logits.shape[-1]
    index = torch.tensor(rows, device=device)
    sub = logits.index_select(0, index)  # [n, vocab]

    bias = [(j, t, b) for j, h in enumerate(picked) for t, b in h.params.logit_bias]
    if bias:
        at_rows, at_tokens, values = zip(*bias)
        sub.index_put_((_ids(at_rows, device), _ids(at_tokens, device)), _floats(values, device), accumulate=True)
    banned = [(j, t) for j, h in enumerate(picked) for t in h.banned]
    if banned:
        at_rows, at_tokens = zip(*banned)
        sub[_ids(at_rows, device), _ids(at_tokens, device)] = float("-inf")

    if any(h.seen is not None for h in picked):
        none = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen = torch.stack([none if h.seen is None else h.seen for h in picked])  # [n, vocab]
        penalty = _floats([h.params.repetition_penalty for h in picked], device)[:, None]  # [n, 1]
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if any(h.counts is not None for h in picked):
        none = torch.zeros(vocab, dtype=torch.float32, device=device)
        counts = torch.stack([none if h.counts is None else h.counts for h in picked])  # [n, vocab]
        frequency = _floats([h.params.frequency_penalty for h in picked], device)[:, None]  # [n, 1]
        presence = _floats([h.params.presence_penalty for h in picked], device)[:, None]
        sub = sub - frequency * counts - presence * (counts > 0).float()
    return logits.index_copy(0, index, sub)


def _ids(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _floats(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """None for greedy rows; a generator seeded with params.seed, or from OS entropy without a seed.

    One generator per request (not one shared RNG) is what makes a seeded row's draws
    independent of its batch-mates and of how many steps other requests have run.
    """
    if params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[TokenHistory | None] | None = None,
) -> torch.Tensor:
    """logits [batch, vocab] (any float dtype; compute in fp32) -> token ids [batch] (long, same device).

    Rows with a history first get their logit adjustments (`adjust_logits`). Greedy rows: argmax (ties -> lowest
    id, like torch.argmax). Sampling rows: divide by temperature, drop what min_p drops, keep top_k, keep the
    smallest set whose probability >= top_p (always at least one token), then draw with torch.multinomial using
    that row's generator. A generator of None draws from torch's global RNG.
    """
    # logits: [batch, vocab]
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"got {logits.shape[0]} logit rows, {len(params)} params and {len(generators)} generators")
    if histories is not None:
        logits = adjust_logits(logits.float(), histories)
    if not any(map(_temperature, params)):
        return torch.argmax(logits, dim=-1)  # [batch]

    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    picked = [params[i] for i in rows]
    tokens = torch.argmax(logits, dim=-1)  # [batch]; sampling rows are overwritten below
    row_index = torch.tensor(rows, device=logits.device)
    probs = _filtered_probs(logits.index_select(0, row_index).float(), picked)  # [n, vocab]
    drawn = torch.cat(
        [
            torch.multinomial(probs[j], num_samples=1, generator=generators[i])  # [1]
            for j, i in enumerate(rows)
        ]
    )  # [n]
    tokens[row_index] = drawn
    return tokens


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p for all sampling rows at once -> probabilities in vocab order.

    Probabilities stay in vocab order (the mask is built on sorted logits and scattered back)
    so a row's multinomial input does not depend on whether a batch-mate needed sorting.
    """
    # logits: [n, vocab] fp32
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor(
        [max(p.temperature, MIN_TEMPERATURE) for p in params], dtype=torch.float32, device=device
    )
    logits = logits / temperature.unsqueeze(1)  # [n, vocab]

    if any(p.min_p > 0.0 for p in params):
        min_p = _floats([p.min_p for p in params], device)[:, None]  # [n, 1]
        probs = torch.softmax(logits, dim=-1)  # [n, vocab]
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))

    if all((p.top_k == 0 or p.top_k >= vocab) and p.top_p >= 1.0 for p in params):
        return _finite(torch.softmax(logits, dim=-1), logits)  # [n, vocab]; nothing to filter, skip the sort

    # Stable sort: among tied logits the lower id ranks first, so the cut is deterministic.
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)  # [n, vocab]
    rank = torch.arange(vocab, device=device).unsqueeze(0)  # [1, vocab]

    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)  # [n]
    remove = rank >= top_k.unsqueeze(1)  # [n, vocab]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))

    top_p = torch.tensor([max(p.top_p, MIN_TOP_P) for p in params], dtype=torch.float32, device=device)  # [n]
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [n, vocab]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [n, vocab]
    # A token goes once the tokens ranked above it already reach top_p; the first token has
    # mass_before == 0 < top_p, so at least one survives. Rows with top_p == 1 are exempt:
    # rounding can push mass_before past 1.0 in the tail.
    remove |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)

    remove_in_vocab_order = torch.empty_like(remove).scatter_(1, sorted_ids, remove)  # [n, vocab]
    return _finite(torch.softmax(logits.masked_fill(remove_in_vocab_order, float("-inf")), dim=-1), logits)


def _finite(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A row whose distribution is not finite (its logits were) draws its argmax instead of failing the batch."""
    broken = ~torch.isfinite(probs).all(dim=-1)  # [n]
    if not bool(broken.any()):
        return probs
    argmax = logits.nan_to_num(nan=-torch.inf).argmax(dim=-1)  # [n]
    fallback = torch.nn.functional.one_hot(argmax, probs.shape[-1]).to(probs.dtype)
    return torch.where(broken[:, None], fallback, probs)
