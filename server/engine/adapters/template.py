"""Template tasks: a discrete prompt (instruction, few-shot examples) with zero parameters.

The text before the user's input never changes, so its tokens are prefilled once per task
version and their KV reused as a prefix for every request: the same path that serves
prefix tuning, except these keys went through RoPE at positions 0..n-1 like any token.
"""

from __future__ import annotations

from dataclasses import replace

from adapters_store import AdapterKey
from adapters_store.format import TEMPLATE_KIND, Template, parse_prompt_format, parse_template
from server.engine.adapters.base import AdapterError, LoadedAdapter


def load_template(key: AdapterKey, data: bytes, tokenizer) -> LoadedAdapter:
    if tokenizer is None:
        raise AdapterError("template tasks need a backbone with a tokenizer")
    template = parse_template(data)
    return LoadedAdapter(key=key, kind=TEMPLATE_KIND, template=template, template_ids=leading_ids(template, tokenizer))


def with_prompt_format(adapter: LoadedAdapter, data: bytes) -> LoadedAdapter:
    """An adapter whose requests are wrapped in the text it was trained with (no leading text: no cached KV)."""
    return replace(adapter, template=parse_prompt_format(data))


def leading_ids(template: Template, tokenizer) -> tuple[int, ...]:
    """Token ids of the fixed part; every request's tokens must start with exactly these."""
    if not template.chat:
        leading, _ = template.render("")
        return tuple(tokenizer.encode(leading)) if leading else ()
    fixed = template.render_messages("")[:-1]  # system and examples, without the user's turn
    if not fixed:
        return ()
    ids = _chat_ids(tokenizer, fixed, generation_prompt=False)
    probe = _chat_ids(tokenizer, template.render_messages("probe"), generation_prompt=True)
    if probe[: len(ids)] != ids:
        raise AdapterError("this backbone's chat template renders the examples differently with a following turn")
    return tuple(ids)


def render_ids(adapter: LoadedAdapter, user_input: str, tokenizer) -> tuple[int, ...]:
    """A request's own tokens: everything after the template's cached leading tokens."""
    template: Template = adapter.template
    if not template.chat:
        _, rest = template.render(user_input)
        return tuple(tokenizer.encode(rest))
    ids = _chat_ids(tokenizer, template.render_messages(user_input), generation_prompt=True)
    return tuple(ids[len(adapter.template_ids) :])


def _chat_ids(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
    )
