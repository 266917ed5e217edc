"""Field types the request schemas share: text that is valid Unicode, and sampling values that sampling can use.

JSON may carry a lone surrogate (`"\\ud800"`), which Python decodes into a `str` that cannot be encoded again: a
tokenizer fails on it and a stored description breaks every later answer that includes it. `Text` refuses it.

Sampling divides the logits by the temperature in float32 and cuts the vocabulary at `top_p` in float32: a temperature
near 1e-38 overflows the logits to inf, a `top_p` below float32's smallest value becomes 0 and cuts every token, and
both turn the probabilities into NaN. These types keep every accepted value finite and usable: non-finite numbers
(JSON's `Infinity`, `NaN`) and values past the bounds are refused with a 400 naming the field, and tiny positive
values are raised to a floor that samples the same way.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

# vLLM's floor: below it, logits / t grows past what float32 holds; at it, sampling is as good as greedy
MIN_TEMPERATURE = 1e-2
# past it, every token is equally likely to within float32 precision; nothing is lost by refusing more
MAX_TEMPERATURE = 100.0
# below the smallest probability any token can have (1 / vocabulary) top_p keeps only the top token, as it does here
MIN_TOP_P = 1e-8
SEED_LIMIT = 2**64  # seeds are unsigned 64-bit (torch.Generator.manual_seed)
MAX_TOP_K = 2**31 - 1
MAX_LOGPROBS = 20  # alternatives per token, as in vLLM
MAX_STOP_TOKENS = 64
MAX_LOGIT_BIAS = 1024  # entries; each costs a little on every step of its row
UNSUPPORTED_PARAMETER = "unsupported_parameter"  # the error type of a declared field given a value it cannot honour


def unsupported(field: str, why: str) -> PydanticCustomError:
    """The validation error of a field this server declares only to refuse (its "off" value aside)."""
    return PydanticCustomError(
        UNSUPPORTED_PARAMETER, "{field} is not supported by this server: {why}", {"field": field, "why": why}
    )


def valid_unicode(text: str) -> str:
    """`text` unless it holds a lone surrogate, which no UTF-8 encoder (or tokenizer) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise ValueError(
            f"holds a lone surrogate (U+{code:04X}) at character {exc.start}; send valid Unicode"
        ) from None
    return text


def valid_unicode_tree(value: Any) -> Any:
    """`valid_unicode` on every string (keys too) of a JSON value."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            valid_unicode(item)
        elif isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item
    return value


def _temperature_floor(value: float) -> float:
    return MIN_TEMPERATURE if 0.0 < value < MIN_TEMPERATURE else value


def _top_p_floor(value: float) -> float:
    return max(value, MIN_TOP_P)


Text = Annotated[str, AfterValidator(valid_unicode)]
Temperature = Annotated[
    float, Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False), AfterValidator(_temperature_floor)
]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False), AfterValidator(_top_p_floor)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
