"""The OpenAI-compatible routes through the official `openai` client, against a live server."""

from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest

from server.api.inference import room_for

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name one colour."}]


@pytest.fixture(scope="module")
def backbone_name(http) -> str:
    return http.get("/ready").json()["model"]


def native(http, task_id: str = "base", **body) -> dict:
    response = http.post(f"/v1/tasks/{task_id}/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_matches_the_native_route(client, http):
    completion = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    expected = native(http, prompt=PROMPT, max_new_tokens=8)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.model == "base" and len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.text == expected["text"] and choice.finish_reason == expected["finish_reason"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_completion_defaults_to_16_tokens_and_a_list_of_one_prompt_is_fine(client):
    completion = client.completions.create(
        model="base", prompt=[PROMPT], temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 16 and completion.choices[0].finish_reason == "length"


def test_default_temperature_samples_and_a_seed_repeats(client):
    runs = [client.completions.create(model="base", prompt="Once", max_tokens=12, seed=7) for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text
    negative = client.completions.create(model="base", prompt="Once", max_tokens=4, seed=-5)  # wraps, no 400
    assert negative.usage.completion_tokens >= 1


def test_chat_matches_the_native_route_and_names_the_backbone(client, http, backbone_name):
    chat = client.chat.completions.create(model=backbone_name, messages=CHAT, max_tokens=10, temperature=0)
    expected = native(http, messages=CHAT, max_new_tokens=10)
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion" and chat.model == backbone_name
    message = chat.choices[0].message
    assert message.role == "assistant" and message.content == expected["text"]
    assert chat.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_chat_stops_at_a_stop_string(client):
    chat = client.chat.completions.create(
        model="base", messages=CHAT, max_completion_tokens=30, temperature=0, stop="e"
    )
    assert "e" not in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model="base",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_opens_with_the_role_and_equals_the_whole_one(client):
    whole = client.chat.completions.create(model="base", messages=CHAT, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(model="base", messages=CHAT, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_models_list_the_backbone_and_every_task(client, backbone_name, capitals):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == backbone_name and capitals in ids
    task = client.models.retrieve(capitals)
    assert task.id == capitals and task.owned_by == "taskserve" and task.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-task")


def test_a_task_is_a_model(client, capitals):
    completion = client.completions.create(model=capitals, prompt="France", max_tokens=3, temperature=0)
    assert "Paris" in completion.choices[0].text
    assert completion.system_fingerprint == f"{capitals}@1"
    chat = client.chat.completions.create(
        model=capitals, messages=[{"role": "user", "content": "France"}], max_tokens=3, temperature=0
    )
    assert chat.choices[0].message.content == completion.choices[0].text  # the template wraps the one message


@pytest.mark.parametrize("model", ["no-such-task", "org/not-a-task-id"])
def test_an_unknown_model_is_not_found(client, model):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model=model, prompt="x", max_tokens=2)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert model in caught.value.message


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),  # the live server's batch holds 8 rows
        ({"prompt": ["a"] * 5, "n": 2}, "prompt"),
        ({"prompt": [], "n": 2}, "prompt"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": "x " * 9000}, "prompt"),
    ],
)
def test_bad_parameters_are_bad_requests(client, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": "base", "prompt": "x", "max_tokens": 4, **params})
    assert caught.value.type == "invalid_request_error" and caught.value.param == param


def test_a_prompt_past_the_context_is_named_as_each_route_calls_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x " * 9000}], max_tokens=2)
    assert caught.value.param == "messages" and caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="x " * 7000, max_tokens=2000)
    assert caught.value.param == "max_tokens" and caught.value.code == "context_length_exceeded"


@pytest.mark.parametrize("field", ["use_beam_search", "mirostat_tau", "guided_decoding_backend"])
def test_an_unknown_field_is_a_bad_request_naming_it(client, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="x", max_tokens=2, extra_body={field: 1})
    assert caught.value.param == field and caught.value.code == "unknown_parameter"
    assert field in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=CHAT, max_tokens=2, extra_body={field: 1})
    assert caught.value.param == field and caught.value.code == "unknown_parameter"


def test_a_refused_field_passes_off_and_is_refused_on(client):
    off = client.completions.create(model="base", prompt="x", max_tokens=2, best_of=1, suffix="")
    assert off.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="base", prompt="x", max_tokens=2, best_of=2)
    assert caught.value.param == "best_of" and caught.value.code == "unsupported_parameter"
    assert "n choices" in caught.value.message


def test_an_unknown_field_inside_a_message_is_named(client):
    message = {**CHAT[0], "audio": {"id": "a"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=[message], max_tokens=2)
    assert caught.value.param == "messages.0.audio" and caught.value.code == "unknown_parameter"


def test_the_native_route_refuses_an_unknown_field(http):
    response = http.post("/v1/tasks/base/generate", json={"prompt": "x", "max_new_tokens": 2, "mirostat": 1})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("mirostat: unknown parameter")


def test_bad_chat_parameters_are_bad_requests(client):
    for params in ({"messages": []}, {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"n": 0}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": "base", "messages": CHAT, **params})


def test_chat_without_a_limit_fills_what_the_context_leaves():
    settings = SimpleNamespace(max_new_tokens=2048, max_kv_tokens=65536)
    engine = SimpleNamespace(backbone=SimpleNamespace(geometry=SimpleNamespace(context_length=8192)), settings=settings)
    assert room_for(engine, None, tuple(range(100))) == 2048  # the server's cap
    assert room_for(engine, None, tuple(range(7000))) == 1192  # the context
    settings.max_kv_tokens = 7050
    assert room_for(engine, None, tuple(range(7000))) == 50  # the KV budget
