"""vLLM's sampling controls through the official `openai` client, against a live server: each changes the output
the way vLLM's does, and bad values are 400s naming the field."""

from __future__ import annotations

import openai
import pytest

PROMPT = "List the days of the week: Monday, Tuesday,"
CHAT = [{"role": "user", "content": "Name one colour."}]


def complete(client, **params) -> openai.types.Completion:
    return client.completions.create(
        **{"model": "base", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **params}
    )


def greedy_ids(http, prompt: str = PROMPT, n: int = 12) -> list[int]:
    body = {"prompt": prompt, "max_new_tokens": n, "ignore_eos": True}
    return http.post("/v1/tasks/base/generate", json=body).json()["token_ids"]


def test_penalties_change_greedy_output_and_repeat(client):
    plain = complete(client).choices[0].text
    penalised = complete(client, presence_penalty=2, frequency_penalty=2, extra_body={"repetition_penalty": 1.5})
    assert penalised.choices[0].text != plain
    again = complete(client, presence_penalty=2, frequency_penalty=2, extra_body={"repetition_penalty": 1.5})
    assert again.choices[0].text == penalised.choices[0].text


def test_logit_bias_bans_and_forces_tokens(client, http):
    first = greedy_ids(http)[0]
    plain = complete(client, max_tokens=1, logprobs=0).choices[0].logprobs
    banned = complete(client, max_tokens=1, logprobs=0, logit_bias={str(first): -100}).choices[0].logprobs
    assert banned.tokens != plain.tokens
    forced = complete(client, max_tokens=3, temperature=0.7, seed=1, logprobs=0, logit_bias={"42": 100})
    forced_tokens = forced.choices[0].logprobs.tokens
    assert len(set(forced_tokens)) == 1 and forced.choices[0].text == "".join(forced_tokens)


def test_stop_token_ids_end_the_text_before_the_token_unless_included(client, http):
    ids = greedy_ids(http)
    stop = ids[3]
    excluded = complete(client, extra_body={"stop_token_ids": [stop]}).choices[0]
    included = complete(client, extra_body={"stop_token_ids": [stop], "include_stop_str_in_output": True}).choices[0]
    assert excluded.finish_reason == included.finish_reason == "stop"

    def text_of(n: int) -> str:
        return http.post("/v1/tasks/base/generate", json={"prompt": PROMPT, "max_new_tokens": n}).json()["text"]

    assert excluded.text == text_of(ids.index(stop)) and included.text == text_of(ids.index(stop) + 1)
    assert included.text != excluded.text


def test_a_stop_string_is_kept_only_when_asked(client):
    whole = complete(client).choices[0].text
    stop = whole.strip()[3:6]
    cut = complete(client, stop=stop).choices[0]
    kept = complete(client, stop=stop, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert stop not in cut.text and kept.text == cut.text + stop and kept.finish_reason == "stop"


def test_min_tokens_and_special_tokens(client):
    short = client.chat.completions.create(model="base", messages=CHAT, max_tokens=40, temperature=0)
    assert short.choices[0].finish_reason == "stop"  # sanity: it ends on EOS by itself
    n = short.usage.completion_tokens
    longer = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=n + 6, temperature=0, extra_body={"min_tokens": n + 4}
    )
    assert longer.usage.completion_tokens >= n + 4
    past_eos = {"model": "base", "messages": CHAT, "max_tokens": n + 2, "temperature": 0}
    hidden = client.chat.completions.create(**past_eos, extra_body={"ignore_eos": True})
    shown = client.chat.completions.create(**past_eos, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert "<|im_end|>" in shown.choices[0].message.content and "<|im_end|>" not in hidden.choices[0].message.content


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"the": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"min_tokens": -1}}, "min_tokens"),
        ({"extra_body": {"min_tokens": 9}}, "min_tokens"),  # more than max_tokens
        ({"extra_body": {"stop_token_ids": [10**9]}}, "stop_token_ids"),
        ({"prompt": [10**9], "extra_body": {"repetition_penalty": 1.2}}, "prompt"),  # checked before any tensor
    ],
)
def test_bad_sampling_controls_are_bad_requests(client, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": "base", "prompt": "x", "max_tokens": 4, **params})
    assert caught.value.param == param
