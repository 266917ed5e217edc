"""Token selection: greedy, temperature, top-k and top-p, with per-request seeds.

The hot path is ``sample``: when every row is greedy it is one ``argmax``. Sampling rows are
filtered together, then each is drawn with its own generator, so a seeded request produces the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch

MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 100.0
# Below these, softmax(logits / temperature) and the top-p cut lose all precision: treated as these (as vLLM does).
MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-8
MAX_LOGPROBS = 20
_SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts unsigned 64-bit seeds

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

    def __post_init__(self) -> None:
        # Normalise a list of stops to a tuple so the params stay hashable; a bare str would
        # silently become one stop string per character, so it is refused.
        if isinstance(self.stop, str):
            raise ValueError("stop must be a sequence of strings, not a single str")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:  # also rejects NaN and infinities
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")

    @property
    def is_greedy(self) -> bool:
        """Greedy rows skip filtering and need no generator."""
        return self.temperature == 0.0


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
) -> torch.Tensor:
    """logits [batch, vocab] (any float dtype; compute in fp32) -> token ids [batch] (long, same device).

    Greedy rows: argmax (ties -> lowest id, like torch.argmax). Sampling rows: divide by
    temperature, keep top_k, keep the smallest set whose probability >= top_p (always at least
    one token), then draw with torch.multinomial using that row's generator. A generator of
    None draws from torch's global RNG.
    """
    # logits: [batch, vocab]
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"got {logits.shape[0]} logit rows, {len(params)} params and {len(generators)} generators")
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
