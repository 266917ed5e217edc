"""Structured outputs and tool calls on the request side: the fields clients send (OpenAI's `response_format`,
`tools` and `tool_choice`; vLLM's `structured_outputs` and older `guided_*`), turned into the one `Constraint` the
engine masks a row with, and a tool call read back out of the text generated under it.

A request names at most one constraint. Tool calls need no parser of the model's own format: with `tool_choice`
"required" or a named function the output is generated under a JSON schema, so it is a call by construction. "auto"
would need that parser (the model decides whether to call), and none exists here: it is refused.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.fields import Text
from server.engine.grammar import Constraint
from server.engine.request import InvalidRequest

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names
NO_PARAMETERS = {"type": "object", "properties": {}}
ANY_OBJECT = '{"type": "object"}'


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output must match")
    strict: bool | None = Field(default=None, description="accepted: the output always matches the schema")


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: `text` (off), `json_object` (any JSON object), or `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type 'json_schema', and only with it")
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json", description="a JSON schema")
    regex: Text | None = None
    choice: list[Text] | None = Field(default=None, min_length=1)
    grammar: Text | None = Field(default=None, description="a Lark or GBNF grammar")
    json_object: bool | None = Field(default=None, description="true: any JSON object")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def constraint(self, param: str = "structured_outputs") -> Constraint:
        if self.json_object:
            return Constraint("json", ANY_OBJECT, param=f"{param}.json_object")
        if self.json_ is not None:
            return Constraint("json", _schema_text(self.json_, f"{param}.json"), param=f"{param}.json")
        if self.choice is not None:
            return Constraint("choice", json.dumps(self.choice), param=f"{param}.choice")
        if self.regex is not None:
            return Constraint("regex", self.regex, param=f"{param}.regex")
        return Constraint("grammar", self.grammar, param=f"{param}.grammar")


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema; none: no arguments")
    strict: bool | None = Field(default=None, description="accepted: arguments always match the schema")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    def template(self) -> dict:
        """The tool as a chat template takes it."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class GuidedFields(BaseModel):
    """vLLM's older names for `structured_outputs`' members, still sent by many clients."""

    guided_json: dict[str, Any] | str | None = Field(default=None, description="vLLM: structured_outputs.json")
    guided_regex: Text | None = Field(default=None, description="vLLM: structured_outputs.regex")
    guided_choice: list[Text] | None = Field(default=None, min_length=1, description="vLLM: structured_outputs.choice")
    guided_grammar: Text | None = Field(default=None, description="vLLM: structured_outputs.grammar")

    def guided(self) -> list[tuple[str, Constraint]]:
        """(field, constraint) for each `guided_*` field given."""
        out = []
        if self.guided_json is not None:
            schema = _schema_text(self.guided_json, "guided_json")
            out.append(("guided_json", Constraint("json", schema, "guided_json")))
        if self.guided_regex is not None:
            out.append(("guided_regex", Constraint("regex", self.guided_regex, "guided_regex")))
        if self.guided_choice is not None:
            out.append(("guided_choice", Constraint("choice", json.dumps(self.guided_choice), "guided_choice")))
        if self.guided_grammar is not None:
            out.append(("guided_grammar", Constraint("grammar", self.guided_grammar, "guided_grammar")))
        return out


def _schema_text(schema: dict | str, param: str) -> str:
    """A schema as canonical JSON text: the cache key of its compiled grammar."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{param}: not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequest(f"{param}: a JSON schema is an object", param=param)
    return json.dumps(schema, sort_keys=False, separators=(",", ":"))


def one_constraint(candidates: list[tuple[str, Constraint | None]]) -> Constraint | None:
    """The request's constraint; naming two is a 400 (which one would win is anyone's guess)."""
    given = [(field, c) for field, c in candidates if c is not None]
    if len(given) > 1:
        names = ", ".join(field for field, _ in given)
        raise InvalidRequest(f"{names}: a request takes one output constraint, got {len(given)}", param=given[1][0])
    return given[0][1] if given else None


def response_format_constraint(fmt: ResponseFormat | None) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json", ANY_OBJECT, param="response_format")
    schema = _schema_text(fmt.json_schema.schema_, "response_format.json_schema.schema")
    return Constraint("json", schema, param="response_format.json_schema.schema")


class ToolCalls:
    """What `tools` and `tool_choice` ask for: a constraint to generate one call under, and the call read back.

    A named function is generated as its arguments alone (an object under its `parameters`); "required" as
    `{"name": <one of the tools>, "arguments": {...}}`, an `anyOf` over the tools, so the model also picks which.
    """

    def __init__(self, tools: list[Tool], choice: ToolChoice | None):
        self.tools = tools
        if choice is None or choice == "auto":
            raise InvalidRequest(
                "tool_choice 'auto' (the default with tools) needs a parser of the model's own tool-call format, "
                "and this server has none for its model: send tool_choice 'required' or name a function "
                "({'type': 'function', 'function': {'name': ...}}), or 'none'",
                param="tool_choice",
            )
        if not tools:
            raise InvalidRequest("tool_choice asks for a call, but tools is empty", param="tools")
        by_name = {t.function.name: t.function for t in tools}
        if len(by_name) != len(tools):
            raise InvalidRequest("tools: two functions share a name", param="tools")
        self.named: str | None = None
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in by_name:
                raise InvalidRequest(
                    f"tool_choice names {choice.function.name!r}, which is not among tools", param="tool_choice"
                )
            self.named = choice.function.name
            schema = _parameters(by_name[self.named])
        else:  # required
            schema = {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"name": {"const": name}, "arguments": _parameters(function)},
                        "required": ["name", "arguments"],
                        "additionalProperties": False,
                    }
                    for name, function in by_name.items()
                ]
            }
        self.constraint = Constraint("json", json.dumps(schema, separators=(",", ":")), param="tools")

    @classmethod
    def of(cls, tools: list[Tool] | None, choice: ToolChoice | None) -> ToolCalls | None:
        """None when the request asks for no call: no tools, or tool_choice 'none' (the tools are then ignored)."""
        if choice == "none" or (not tools and choice is None):
            return None
        return cls(tools or [], choice)

    def reader(self) -> CallReader:
        return CallReader(self.named)


class CallReader:
    """One call read out of its output as the output is generated (streamed calls), or whole.

    The output is compact JSON (`JSON_OPTIONS`) whose keys come in the schema's order, so under "required" it reads
    `{"name":"<name>","arguments":<arguments>}` exactly: the name is known once `","arguments":` has come, and the
    arguments are what follows, less the closing brace (so the last character is held back until the end).
    """

    HEAD, SEPARATOR = '{"name":"', '","arguments":'

    def __init__(self, named: str | None):
        self.wrapped = named is None
        self.name = named
        self.text = ""
        self.start = None if self.wrapped else 0  # where the arguments begin in `text`, once known
        self.sent = 0  # characters of the arguments given out so far
        self.id = f"call_{uuid.uuid4().hex[:24]}"
        self.announced = False  # streamed: whether its id and name went out yet

    def push(self, text: str, last: bool = False) -> str:
        """Take more output; the arguments' new text (the rest of it at the `last` push)."""
        self.text += text
        if self.start is None:
            at = self.text.find(self.SEPARATOR, len(self.HEAD))
            if at < 0:
                return ""
            self.name, self.start = self.text[len(self.HEAD) : at], at + len(self.SEPARATOR)
        end = len(self.text)
        if self.wrapped and (not last or self.text.endswith("}")):
            end -= 1  # what is, or may yet be, the wrapper's closing brace
        new = self.text[self.start + self.sent : max(end, self.start + self.sent)]
        self.sent += len(new)
        return new

    @property
    def arguments(self) -> str:
        return "" if self.start is None else self.text[self.start : self.start + self.sent]

    @property
    def complete(self) -> bool:
        """Whether a whole call was read: a name and arguments that parse (a stop string may have cut them)."""
        try:
            return self.name is not None and self.start is not None and json.loads(self.arguments) is not None
        except json.JSONDecodeError:
            return False

    def call(self, text: str) -> dict | None:
        """The call of a whole output, as OpenAI's `tool_calls` entry; None unless it is `complete`."""
        self.push(text, last=True)
        if not self.complete:
            return None
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _parameters(function: FunctionDefinition) -> dict:
    return function.parameters if function.parameters is not None else NO_PARAMETERS
