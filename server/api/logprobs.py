"""Log-probabilities as each API shows them: the native route's, OpenAI chat's and OpenAI completions'.

The engine gives token ids with their log-probabilities under the row's own distribution (after its adapter, before
temperature, top-k/top-p and penalties: what vLLM calls raw log-probabilities); here they become token strings.
A token's string is its own decoding, as vLLM shows it: a byte-level token that holds part of a character decodes
to U+FFFD, and its `bytes` (chat) say which bytes it holds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from server.engine.request import TokenLogprob

# JSON has no -infinity: a token the model rules out entirely shows this, as in vLLM
FLOOR = -9999.0


@functools.lru_cache(maxsize=1 << 16)
def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def native(tokenizer: Any, scored: Sequence[TokenLogprob | None]) -> list[dict | None]:
    """`{token_id, token, logprob, top_logprobs: [{token_id, token, logprob}]}` per token (None: not scored)."""

    def one(token_id: int, logprob: float) -> dict:
        return {"token_id": token_id, "token": token_text(tokenizer, token_id), "logprob": _value(logprob)}

    return [
        None if lp is None else {**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}
        for lp in scored
    ]


def chat(tokenizer: Any, scored: Sequence[TokenLogprob]) -> list[dict]:
    """OpenAI chat's `logprobs.content`: `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`."""

    def one(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8"))}

    return [{**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]} for lp in scored]


def completion(tokenizer: Any, scored: Sequence[TokenLogprob | None], token_ids: Sequence[int], offset: int) -> dict:
    """OpenAI completions' `logprobs`: parallel lists `tokens`, `token_logprobs`, `top_logprobs` (the top tokens
    and the chosen one, by string) and `text_offset` (each token's start in the choice's text, from `offset`)."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, lp in zip(token_ids, scored):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_value(lp.logprob))
        top = {token_text(tokenizer, t): _value(v) for t, v in lp.top}
        top.setdefault(text, _value(lp.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
