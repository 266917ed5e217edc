"""Structured outputs and tool calls through the official `openai` client, against the live server on the default
model: outputs parse and match what was asked, streamed or not; what cannot be honoured is a 400 naming its field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

CHAT = [{"role": "user", "content": "Describe a person called Ann as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]},
    },
}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def chat(client, **params):
    return client.chat.completions.create(**{"model": "base", "messages": CHAT, "temperature": 0, **params})


def streamed(client, **params) -> tuple[str, list[dict], str | None, list]:
    """(content, tool-call deltas, finish_reason, chunks) of a streamed chat completion."""
    chunks = list(chat(client, stream=True, **params))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [
        tc.model_dump(exclude_none=True) for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()
    ]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return content, calls, finish[-1] if finish else None, chunks


def test_a_json_schema_response_parses_and_validates_streamed_or_not(client):
    done = chat(client, response_format=AS_SCHEMA, max_tokens=80)
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    content, _, finish, _ = streamed(client, response_format=AS_SCHEMA, max_tokens=80)
    assert content == choice.message.content and finish == "stop"
    assert done.usage.prompt_tokens_details.cached_tokens == 0


def test_json_object_on_both_routes_and_n_sampled_choices(client):
    done = chat(client, response_format=AS_SCHEMA, max_tokens=80, n=3, temperature=1, seed=5)
    for choice in done.choices:  # each choice walks the schema on its own
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    anything = chat(client, response_format={"type": "json_object"}, max_tokens=120)
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:  # cut by max_tokens: what came is the head of an object
        assert anything.choices[0].message.content.startswith("{")
    completion = client.completions.create(
        model="base", prompt="A JSON object about a cat:", max_tokens=60, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
    )  # fmt: skip
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


def test_vllm_structured_outputs_and_guided_fields(client, http):
    regex = client.completions.create(
        model="base", prompt="Call me at", max_tokens=20, temperature=0,
        extra_body={"structured_outputs": {"regex": r" \d{3}-\d{4}"}},
    )  # fmt: skip
    assert re.fullmatch(r" \d{3}-\d{4}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    picked = chat(client, max_tokens=5, extra_body={"guided_choice": ["yes", "no"]})
    assert picked.choices[0].message.content in ("yes", "no")
    grammar = chat(client, max_tokens=20, extra_body={"structured_outputs": {"grammar": 'start: "A" /[0-9]{2}/'}})
    assert re.fullmatch(r"A[0-9]{2}", grammar.choices[0].message.content)
    native = http.post(
        "/v1/tasks/base/generate",
        json={"prompt": "Pick a colour:", "max_new_tokens": 8, "structured_outputs": {"choice": [" red", " blue"]}},
    ).json()
    assert native["text"] in (" red", " blue") and native["finish_reason"] == "stop"


def test_stop_strings_still_cut_a_constrained_output(client):
    whole = chat(client, response_format=AS_SCHEMA, max_tokens=80).choices[0].message.content
    cut = chat(client, response_format=AS_SCHEMA, max_tokens=80, stop=['"age"']).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == whole[: whole.index('"age"')]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs.regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: nowhere"}}}, "structured_outputs.grammar"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": [WEATHER]}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_400_naming_its_field(client, params, param):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, max_tokens=4, **params)
    assert caught.value.param == param, caught.value.message
    assert caught.value.code in ("invalid_request", "unsupported_parameter")


def test_auto_tool_choice_says_why(client):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, max_tokens=4, tools=[WEATHER])
    assert "parser" in caught.value.message and "required" in caught.value.message


def test_a_named_function_is_called_with_arguments_under_its_schema(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    done = chat(client, tools=[WEATHER, TIME], tool_choice=named, max_tokens=60)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    content, deltas, finish, _ = streamed(client, tools=[WEATHER, TIME], tool_choice=named, max_tokens=60)
    assert content == "" and finish == "tool_calls"
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["type"] == "function" and "id" in deltas[0]
    assert "".join(d["function"].get("arguments", "") for d in deltas) == call.function.arguments


def test_required_picks_one_of_the_tools_streamed_or_not(client):
    done = chat(client, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    _, deltas, finish, _ = streamed(client, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60)
    assert finish == "tool_calls" and deltas[0]["function"]["name"] == call.function.name
    assert "".join(d["function"].get("arguments", "") for d in deltas) == call.function.arguments


def test_tool_choice_none_ignores_the_tools(client):
    plain = chat(client, max_tokens=8)
    ignored = chat(client, max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert ignored.choices[0].message.content == plain.choices[0].message.content
    assert ignored.choices[0].message.tool_calls is None


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


def test_the_clients_own_parse_helpers_work_unchanged(client):
    """`chat.completions.parse` sends a strict schema made from a pydantic model, and parses what comes back."""
    done = client.chat.completions.parse(
        model="base", messages=CHAT, temperature=0, max_tokens=80, response_format=Person
    )
    assert isinstance(done.choices[0].message.parsed, Person)
    called = client.chat.completions.parse(
        model="base", messages=CHAT, temperature=0, max_tokens=80,
        tools=[openai.pydantic_function_tool(Person, name="save_person")],
        tool_choice={"type": "function", "function": {"name": "save_person"}},
    )  # fmt: skip
    assert isinstance(called.choices[0].message.tool_calls[0].function.parsed_arguments, Person)


def test_a_conversation_goes_on_after_a_call(client):
    """The call and the tool's answer go back in `messages`, as an agent loop sends them; a template that does not
    render calls (SmolLM2's) sees the call as the text it was generated as."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = chat(client, tools=[WEATHER], tool_choice=named, max_tokens=60).choices[0].message
    call = first.tool_calls[0]
    history = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(model="base", messages=history, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    text_turn = {"role": "assistant", "content": f'{{"name":"get_weather","arguments":{call.function.arguments}}}'}
    same = client.chat.completions.create(
        model="base", messages=[*CHAT, text_turn, history[2]], max_tokens=8, temperature=0
    )
    assert same.choices[0].message.content == answer.choices[0].message.content
    for bad in ({"role": "tool", "content": "x"}, {"role": "user", "content": "x", "tool_call_id": "c"},
                {"role": "assistant", "content": None}):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="base", messages=[*CHAT, bad], max_tokens=2)
        assert caught.value.param == "messages.1"
