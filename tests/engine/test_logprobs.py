"""Log-probabilities as the engine returns them, against the reference model's (and PEFT's) own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_reference import load_reference, make_adapter, tiny_llama
from serving import serve

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, TokenDelta
from server.engine.sampling import SamplingParams

PROMPT = (5, 17, 33, 8, 91, 4, 60, 2, 77, 13)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    model = tiny_llama()
    root = tmp_path_factory.mktemp("logprob-adapters")
    dirs = {"lora": make_adapter(model, "lora_qv", root / "lora", seed=1)}
    dirs["prefix"] = make_adapter(model, "prefix", root / "prefix", seed=3)
    backbone = Backbone(copy.deepcopy(model), None, name="tiny")
    engine = Engine(backbone, EngineSettings(max_step_tokens=4))  # prompts prefill in chunks of 4 inputs
    for task, path in dirs.items():
        serve(engine.residency, task, path)
    yield model, dirs, engine
    engine.stop()
    engine.runner.hooks.remove()


def run(engine: Engine, requests: list[GenerationRequest]) -> list[list[TokenDelta]]:
    sinks: list[list[TokenDelta]] = [[] for _ in requests]
    for request, sink in zip(requests, sinks):
        engine.submit(request, sink.append)
    engine.run_until_idle()
    return sinks


@torch.inference_mode()
def reference_logprobs(model, adapter_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: log-probabilities of the next token after each position, from one full forward."""
    ref = load_reference(model, adapter_dir)
    logits = ref(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    return torch.log_softmax(logits[0, -len(ids) :].float(), dim=-1)


@pytest.mark.parametrize("task", ["base", "lora", "prefix"])
def test_prompt_and_token_logprobs_match_the_reference_in_a_mixed_batch(setup, task):
    model, dirs, engine = setup
    sampling = SamplingParams(max_new_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    mates = [GenerationRequest(PROMPT[::-1], SamplingParams(max_new_tokens=6), task_id=t) for t in dirs]
    deltas = run(engine, [mates[0], GenerationRequest(PROMPT, sampling, task_id=task), mates[1]])[1]
    tokens = [t for d in deltas for t in d.token_ids]
    expected = reference_logprobs(model, dirs.get(task), [*PROMPT, *tokens])  # [prompt + new, vocab]

    prompt = deltas[0].prompt_logprobs
    assert len(prompt) == len(PROMPT) and prompt[0] is None
    for i, scored in enumerate(prompt[1:], start=1):
        row = expected[i - 1]
        assert scored.token == PROMPT[i]
        assert abs(scored.logprob - row[PROMPT[i]].item()) < TOLERANCE
        assert [t for t, _ in scored.top] == row.topk(2).indices.tolist()
    generated = [lp for d in deltas for lp in d.logprobs or ()]
    assert len(generated) == len(tokens) == 4
    for j, scored in enumerate(generated):
        row = expected[len(PROMPT) - 1 + j]
        assert scored.token == tokens[j] == row.argmax().item()  # greedy: the top token
        assert abs(scored.logprob - row[tokens[j]].item()) < TOLERANCE
        top_ids, top_values = zip(*scored.top)
        assert list(top_ids) == row.topk(3).indices.tolist()
        assert torch.allclose(torch.tensor(top_values), row.topk(3).values, atol=TOLERANCE)
    assert all(d.prompt_logprobs is None for d in deltas[1:])  # once, in the first delta


def test_no_new_tokens_scores_the_prompt_only(setup):
    model, dirs, engine = setup
    sampling = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    (delta,) = run(engine, [GenerationRequest(PROMPT, sampling, task_id="lora")])[0]
    assert delta.token_ids == [] and delta.finish_reason == "length" and delta.completion_tokens == 0
    expected = reference_logprobs(model, dirs["lora"], list(PROMPT))
    got = torch.tensor([lp.logprob for lp in delta.prompt_logprobs[1:]])
    assert torch.allclose(got, expected[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0], atol=TOLERANCE)
    assert all(lp.top == () for lp in delta.prompt_logprobs[1:])


def test_rows_that_ask_for_nothing_get_nothing(setup):
    _, _, engine = setup
    (deltas,) = run(engine, [GenerationRequest(PROMPT, SamplingParams(max_new_tokens=2))])
    assert all(d.logprobs is None and d.prompt_logprobs is None for d in deltas)
