"""Many choices and many prompts through the official `openai` client, against a live server."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest
from transformers import AutoTokenizer

from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

PROMPTS = ["The capital of France is", "Once upon a time"]
CHAT = [{"role": "user", "content": "Name one colour."}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_cache_dir() / DEFAULT_MODEL)


def test_n_greedy_choices_are_alike_and_the_prompt_counts_once(client):
    one = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    many = client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=6, temperature=0, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert {c.text for c in many.choices} == {one.choices[0].text}
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_prompts_times_n_in_order_each_choice_with_its_own_seed(client):
    params = {"model": "base", "max_tokens": 8, "temperature": 1.0, "seed": 21}
    many = client.completions.create(prompt=PROMPTS, n=2, **params)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(PROMPTS):
        for i in range(2):
            alone = client.completions.create(prompt=prompt, **{**params, "seed": 21 + i})
            assert many.choices[2 * p + i].text == alone.choices[0].text
    assert many.choices[0].text != many.choices[1].text  # sanity: the choices sample apart
    singles = [client.completions.create(prompt=p, **params).usage.prompt_tokens for p in PROMPTS]
    assert many.usage.prompt_tokens == sum(singles)


def test_token_id_prompts_are_the_same_prompts(client, tokenizer):
    texts = client.completions.create(model="base", prompt=PROMPTS, max_tokens=5, temperature=0)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    one = client.completions.create(model="base", prompt=ids[0], max_tokens=5, temperature=0, echo=True)
    assert one.choices[0].text == PROMPTS[0] + texts.choices[0].text
    lists = client.completions.create(model="base", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in lists.choices] == [c.text for c in texts.choices]


def test_a_template_task_takes_text_not_token_ids(client, capitals, tokenizer):
    with pytest.raises(openai.BadRequestError, match="template"):
        client.completions.create(model=capitals, prompt=tokenizer.encode("France"), max_tokens=2)


def test_streamed_chat_choices_interleave_by_index_and_equal_the_whole_ones(client):
    params = {"model": "base", "messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 2}
    whole = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    texts, finishes = defaultdict(str), {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(2)] == [c.message.content for c in whole.choices]
    assert [finishes[i] for i in range(2)] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_scoring_takes_one_choice(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="x", max_tokens=0, echo=True, n=2)
    assert caught.value.param == "n"
