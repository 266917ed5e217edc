"""n choices for one prompt: rows forked from one prefill, each as if it ran alone, the KV all given back."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_reference import make_adapter, peft_greedy, tiny_llama
from serving import serve

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, InvalidRequest, TokenDelta
from server.engine.sampling import SamplingParams

PROMPT = tuple(range(20, 43))  # 23 tokens: prefilled in chunks of 8, the shared part ends mid-block
NEW = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    model = tiny_llama()
    root = tmp_path_factory.mktemp("choice-adapters")
    dirs = {"lora": make_adapter(model, "lora_qv", root / "lora", seed=1)}
    dirs["prefix"] = make_adapter(model, "prefix", root / "prefix", seed=3)
    return model, dirs


@pytest.fixture
def engine(setup):
    _, dirs = setup
    engine = Engine(
        Backbone(copy.deepcopy(setup[0]), None, name="tiny"),
        EngineSettings(max_step_tokens=8, kv_block_size=4, max_n=4, max_kv_tokens=1024),
    )
    for task, path in dirs.items():
        serve(engine.residency, task, path)
    yield engine
    engine.stop()
    engine.runner.hooks.remove()


def run(engine: Engine, request: GenerationRequest) -> list[list[TokenDelta]]:
    sinks: list[list[TokenDelta]] = [[] for _ in range(request.sampling.n)]
    engine.submit(request, sinks[0].append, choices=[s.append for s in sinks[1:]])
    engine.run_until_idle()
    return sinks


def tokens(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def computed_inputs(engine: Engine) -> list[int]:
    """Spy: inputs each forward computes."""
    counts, forward = [], engine.runner.forward

    def counting(inputs, *rest):
        counts.append(inputs.token_ids.numel())
        return forward(inputs, *rest)

    engine.runner.forward = counting
    return counts


@pytest.mark.parametrize("task", ["base", "lora", "prefix"])
def test_greedy_choices_share_one_prefill_and_match_peft(setup, engine, task):
    model, dirs = setup
    counts = computed_inputs(engine)
    sampling = SamplingParams(max_new_tokens=NEW, ignore_eos=True, n=3, prompt_logprobs=1)
    choices = run(engine, GenerationRequest(PROMPT, sampling, task_id=task))
    expected = peft_greedy(model, dirs.get(task), list(PROMPT), NEW)
    assert [tokens(c) for c in choices] == [expected] * 3
    # the prompt once, each other choice its last prompt input again, then one input per token per choice
    assert sum(counts) == len(PROMPT) + 2 + 3 * (NEW - 1)
    firsts = [c[0].prompt_logprobs for c in choices]
    assert all(f is not None and len(f) == len(PROMPT) for f in firsts) and firsts[1] == firsts[0] == firsts[2]
    assert engine.pool.free_blocks == engine.pool.capacity_blocks  # every block back, shared ones included


def test_each_sampled_choice_is_the_request_with_its_own_seed(engine):
    def sampling(**kw) -> SamplingParams:
        return SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, top_k=20, **kw)

    choices = [tokens(c) for c in run(engine, GenerationRequest(PROMPT, sampling(n=3, seed=11), task_id="lora"))]
    alone = [tokens(run(engine, GenerationRequest(PROMPT, sampling(seed=11 + i), task_id="lora"))[0]) for i in range(3)]
    assert choices == alone and len({tuple(c) for c in choices}) == 3  # the same draws, and they differ


def test_choices_that_end_apart_and_a_cancelled_one_give_every_block_back(engine):
    request = GenerationRequest(PROMPT, SamplingParams(max_new_tokens=NEW, n=3, temperature=1.0, seed=2))
    sinks: list[list[TokenDelta]] = [[] for _ in range(3)]
    parent = engine.submit(request, sinks[0].append, choices=[s.append for s in sinks[1:]])
    parent.children[1].cancel()  # before the fork
    while not parent.output_ids:  # the prompt is computed over 3 steps, then the choices fork
        engine.step()
    parent.cancel()  # the parent leaves first; its choice 1 still reads the shared prompt
    engine.run_until_idle()
    assert sinks[2][-1].finish_reason == "cancelled" and sinks[0][-1].finish_reason == "cancelled"
    assert sinks[1][-1].finish_reason in ("stop", "length") and tokens(sinks[1])
    assert engine.pool.free_blocks == engine.pool.capacity_blocks


def test_cancelling_the_first_choice_before_the_fork_ends_them_all(engine):
    request = GenerationRequest(PROMPT, SamplingParams(max_new_tokens=NEW, n=2))
    sinks: list[list[TokenDelta]] = [[], []]
    engine.submit(request, sinks[0].append, choices=[sinks[1].append]).cancel()
    engine.run_until_idle()
    assert [s[-1].finish_reason for s in sinks] == ["cancelled", "cancelled"]
    assert engine.pool.free_blocks == engine.pool.capacity_blocks


def test_too_many_choices_are_refused(engine):
    with pytest.raises(InvalidRequest, match="n=5"):
        run(engine, GenerationRequest(PROMPT, SamplingParams(max_new_tokens=2, n=5)))
    assert not engine.waiting and engine.pool.free_blocks == engine.pool.capacity_blocks
