"""The engine's greedy tokens equal single-request PEFT's, alone and in mixed continuous batches."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_reference import (
    ALL_SERVED_KINDS,
    COMPOSITES,
    make_adapter,
    make_composite,
    peft_greedy,
    random_biases,
    tiny_gpt2,
    tiny_llama,
)
from serving import serve, tasks_of
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 8, 91, 4], [12, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 3], [44, 45, 46]]
NEW_TOKENS = 12
GPT2_KINDS = (
    *("prompt", "prefix", "prefix_proj", "lora_qv", "lora_all", "lora_rslora", "lora_pattern", "ia3"),
    *("dora", "lora_bias", "lora_bias_only", "dora_bias"),  # GPT-2's layers have biases
    *("vera", "vera_wide"),
)


def make_engine(model, adapter_dirs: dict[str, object], **settings) -> Engine:
    # the engine hooks its backbone's layers; a copy keeps the reference model untouched
    engine = Engine(Backbone(copy.deepcopy(model), None, name="tiny"), EngineSettings(**settings))
    for kind, path in adapter_dirs.items():
        serve(engine.residency, kind, path)
    return engine


def request(prompt: list[int], task: str = "base", new_tokens: int = NEW_TOKENS) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=new_tokens), task_id=task)


def _build(arch: str, tmp_path_factory) -> tuple[torch.nn.Module, dict[str, object]]:
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    kinds = ALL_SERVED_KINDS if arch == "llama" else GPT2_KINDS
    root = tmp_path_factory.mktemp(f"adapters-{arch}")
    dirs = {kind: make_adapter(model, kind, root / kind, seed=i) for i, kind in enumerate(kinds)}
    if arch == "llama":  # composite tasks, mixed with every single kind
        dirs |= {name: make_composite(model, name, root / name, seed=50 + 10 * i) for i, name in enumerate(COMPOSITES)}
    return model, dirs


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def arch_setup(request, tmp_path_factory):
    model, dirs = _build(request.param, tmp_path_factory)
    expected = {
        (kind, i): peft_greedy(model, dirs.get(kind), prompt, NEW_TOKENS)
        for kind in ["base", *dirs]
        for i, prompt in enumerate(PROMPTS)
    }
    return model, dirs, expected


def test_adapters_change_the_output(arch_setup):
    _, dirs, expected = arch_setup
    for kind in dirs:
        assert any(expected[(kind, i)] != expected[("base", i)] for i in range(len(PROMPTS))), kind


def test_each_kind_alone_matches_peft(arch_setup):
    model, dirs, expected = arch_setup
    engine = make_engine(model, dirs)
    for kind in ["base", *dirs]:
        for i, prompt in enumerate(PROMPTS):
            generation = engine.submit(request(prompt, kind), sink=lambda d: None)
            engine.run_until_idle()
            assert generation.output_ids == expected[(kind, i)], (kind, i)


def test_mixed_batch_with_rows_joining_mid_flight_matches_peft(arch_setup):
    model, dirs, expected = arch_setup
    engine = make_engine(model, dirs)
    jobs = [(kind, i) for i in range(len(PROMPTS)) for kind in ["base", *dirs]]
    generations = {}
    # a first wave, a few decode steps, then the rest joins the running batch in two more waves
    waves = [jobs[: len(jobs) // 3], jobs[len(jobs) // 3 : 2 * len(jobs) // 3], jobs[2 * len(jobs) // 3 :]]
    for wave in waves:
        for kind, i in wave:
            generations[(kind, i)] = engine.submit(request(PROMPTS[i], kind), sink=lambda d: None)
        for _ in range(3):
            engine.step()
        assert engine.running is not None and len(engine.running) > 0
    max_rows = len(engine.running)
    engine.run_until_idle()
    assert max_rows >= 6
    for job, generation in generations.items():
        assert generation.output_ids == expected[job], job


@pytest.mark.parametrize("backend", ["loop", "gathered"])
def test_lora_backends_agree_in_a_mixed_batch(arch_setup, backend):
    model, dirs, expected = arch_setup
    engine = make_engine(model, dirs, lora_backend=backend)
    generations = {
        (kind, i): engine.submit(request(PROMPTS[i], kind), sink=lambda d: None)
        for kind in dirs
        if kind.startswith("lora")
        for i in range(len(PROMPTS))
    }
    engine.run_until_idle()
    for job, generation in generations.items():
        assert generation.output_ids == expected[job], job


def _tiny(config_class, **extra):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=2,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    random_biases(model, seed=0)
    return model


@pytest.mark.parametrize("config_class", [Qwen2Config, MistralConfig], ids=["qwen2", "mistral"])
def test_other_llama_family_models_match_peft_in_a_mixed_batch(config_class, tmp_path):
    model = _tiny(config_class)
    kinds = ("prefix", "prompt", "lora_all", "ia3", "dora", "lora_bias_all", "dora_bias")  # Qwen2: q/k/v biases
    kinds += ("llama_adapter",) if config_class is MistralConfig else ()  # PEFT's LLaMA-Adapter: llama, mistral
    dirs = {kind: make_adapter(model, kind, tmp_path / kind, seed=i) for i, kind in enumerate(kinds)}
    engine = make_engine(model, dirs)
    generations = {
        (kind, i): engine.submit(request(prompt, kind), sink=lambda d: None)
        for kind in ("base", *kinds)
        for i, prompt in enumerate(PROMPTS[:2])
    }
    engine.run_until_idle()
    for (kind, i), generation in generations.items():
        expected = peft_greedy(model, dirs.get(kind), PROMPTS[i], NEW_TOKENS)
        assert generation.output_ids == expected, (kind, i)


def test_vera_adapters_share_their_projections_in_the_pool_and_match_peft(tmp_path):
    model = tiny_llama()
    # two adapters on the same projections (PEFT's default key) with their own vectors, one on others
    made = {"v0": ("vera", 0), "v1": ("vera", 1), "wide": ("vera_wide", 2)}
    dirs = {task: make_adapter(model, kind, tmp_path / task, seed=seed) for task, (kind, seed) in made.items()}
    engine = make_engine(model, dirs)
    pool = engine.residency.pool
    assert len(pool.vera_bases) == 2  # v0 and v1 hold one copy of their projections between them
    generations = {
        (task, i): engine.submit(request(prompt, task), sink=lambda d: None)
        for i, prompt in enumerate(PROMPTS)
        for task in ("v0", "base", "v1", "wide")
    }
    engine.run_until_idle()
    for (task, i), generation in generations.items():
        assert generation.output_ids == peft_greedy(model, dirs.get(task), PROMPTS[i], NEW_TOKENS), (task, i)
    assert generations[("v0", 0)].output_ids != generations[("v1", 0)].output_ids  # the vectors do differ
    tasks_of(engine.residency).delete("v0")
    assert len(pool.vera_bases) == 2  # v1 still uses them
    tasks_of(engine.residency).delete("v1")
    assert len(pool.vera_bases) == 1
