"""On the real default model (SmolLM2-135M-Instruct): every kind and a composite task against PEFT, mixed."""

from __future__ import annotations

import json

import pytest
from peft_reference import COMPOSITES, make_adapter, make_composite, peft_greedy
from serving import serve
from transformers import AutoModelForCausalLM

from server.config import EngineSettings
from server.engine.adapters.template import render_ids
from server.engine.backbone import DEFAULT_MODEL, Backbone, default_cache_dir
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

KINDS = (
    *("lora_qv", "lora_rslora", "prefix", "prompt", "ia3"),
    *("dora", "lora_bias", "adalora", "loha", "lokr"),
)
# on one question only (the haiku: open enough for each to change the answer), to keep the test's time:
# each PEFT reference is a cache-free loop on 135M
ONE_QUESTION = ("vera", "llama_adapter", "composite_mam")
FEWER_TOKENS = 6  # and fewer new tokens for those
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.load(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def setup(backbone, tmp_path_factory):
    reference_model = AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL).eval()
    root = tmp_path_factory.mktemp("smollm2-adapters")
    dirs = {kind: make_adapter(reference_model, kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}
    for i, kind in enumerate(ONE_QUESTION, start=len(KINDS)):
        make = make_composite if kind in COMPOSITES else make_adapter
        dirs[kind] = make(reference_model, kind, root / kind, seed=i)
    prompts = [
        backbone.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS
    ]
    expected = {
        (kind, i): peft_greedy(reference_model, dirs.get(kind), list(prompt), NEW_TOKENS)
        for kind in ("base", *KINDS)
        for i, prompt in enumerate(prompts)
    }
    expected |= {
        (kind, 1): peft_greedy(reference_model, dirs[kind], list(prompts[1]), FEWER_TOKENS) for kind in ONE_QUESTION
    }
    return dirs, prompts, expected


def test_default_model_geometry(backbone):
    g = backbone.geometry
    assert (g.num_layers, g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim) == (30, 576, 9, 3, 64)
    assert g.linear_modules["model.layers.0.self_attn.k_proj"].out_features == 192
    assert "lm_head" not in g.linear_modules
    assert backbone.eos_token_ids == {2}


def test_mixed_batch_on_default_model_matches_peft(backbone, setup):
    dirs, prompts, expected = setup
    for kind in KINDS:  # the adapters really change what the model says
        assert any(expected[(kind, i)] != expected[("base", i)] for i in range(len(prompts))), kind
    for kind in ONE_QUESTION:
        assert expected[(kind, 1)] != expected[("base", 1)][:FEWER_TOKENS], kind
    engine = Engine(backbone, EngineSettings())
    for kind, path in dirs.items():
        serve(engine.residency, kind, path)
    generations = {}
    for i, prompt in enumerate(prompts):
        for kind in ("base", *KINDS, *(ONE_QUESTION if i == 1 else ())):
            tokens = FEWER_TOKENS if kind in ONE_QUESTION else NEW_TOKENS
            request = GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=tokens), task_id=kind)
            generations[(kind, i)] = engine.submit(request, sink=lambda d: None)
        engine.step()  # the next prompt's rows join a running batch
    engine.run_until_idle()
    for job, generation in generations.items():
        assert generation.output_ids == expected[job], job
    engine.stop()


def test_template_task_equals_its_text_inline(backbone):
    """The cached KV of a template's leading tokens gives the tokens the same text would give inline."""
    template = {
        "system": "You convert countries to capitals.",
        "examples": [{"input": "Germany", "output": "Berlin"}, {"input": "Italy", "output": "Rome"}],
        "input_prefix": "Country: ",
        "input_suffix": "\nCapital:",
    }
    engine = Engine(backbone, EngineSettings())
    adapter = serve(engine.residency, "capitals", {"template.json": json.dumps(template).encode()})
    sampling = SamplingParams(max_new_tokens=6)
    rows = []
    for country in ("France", "Spain", "Japan"):
        rest = render_ids(adapter, country, backbone.tokenizer)
        templated = engine.submit(GenerationRequest(rest, sampling, task_id="capitals"), sink=lambda d: None)
        inline = engine.submit(GenerationRequest(adapter.template_ids + rest, sampling), sink=lambda d: None)
        rows.append((templated, inline))
    engine.run_until_idle()
    assert adapter.prefix_kv is not None and adapter.prefix_len == len(adapter.template_ids)
    for templated, inline in rows:
        assert templated.output_ids == inline.output_ids
    assert "Paris" in backbone.tokenizer.decode(rows[0][0].output_ids)
