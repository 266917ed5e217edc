"""Log-probabilities through HTTP, with the official `openai` client on an in-process app and the default model.

The log-likelihood test is what eval harnesses do (`echo`, `logprobs`, `max_tokens: 0` on `/v1/completions`),
checked against log-probabilities computed directly from the model, and from PEFT for a LoRA task.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from peft_reference import load_reference, make_adapter
from transformers import AutoModelForCausalLM

from server.app import create_app
from server.config import Settings
from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

TEXT = "The quick brown fox jumps over the lazy dog because it"
CHAT = [{"role": "user", "content": "Name one colour."}]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference_model():
    return AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL).eval()


@pytest.fixture(scope="module")
def lora_dir(reference_model, tmp_path_factory) -> Path:
    return make_adapter(reference_model, "lora_qv", tmp_path_factory.mktemp("lora") / "lora_qv", seed=5)


@pytest.fixture(scope="module")
def http(backbone, lora_dir) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(store="memory://", max_upload_bytes=8_000_000), backbone=backbone)) as http:
        files = [
            ("files", (n, (lora_dir / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")
        ]
        assert http.post("/v1/tasks/scorer/versions", files=files).status_code == 201
        yield http


@pytest.fixture(scope="module")
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@torch.inference_mode()
def reference(model, adapter_dir, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: the log-probabilities of the token after each position, from one plain forward."""
    ref = load_reference(model, adapter_dir)
    logits = ref(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


@pytest.mark.parametrize("task", ["base", "scorer"])
def test_echo_scores_a_prompt_like_the_model_itself(client, backbone, reference_model, lora_dir, task):
    scored = client.completions.create(model=task, prompt=TEXT, max_tokens=0, echo=True, logprobs=3, temperature=0)
    choice = scored.choices[0]
    ids = backbone.tokenizer.encode(TEXT)
    expected = reference(reference_model, lora_dir if task == "scorer" else None, ids)
    got = choice.logprobs.token_logprobs
    assert choice.text == TEXT and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [backbone.tokenizer.decode([t]) for t in ids] and got[0] is None
    want = expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(got[1:]), want, atol=TOLERANCE), (got[1:], want.tolist())
    assert choice.logprobs.text_offset[:3] == [
        0,
        len(choice.logprobs.tokens[0]),
        sum(map(len, choice.logprobs.tokens[:2])),
    ]
    for i, top in enumerate(choice.logprobs.top_logprobs[1:], start=1):
        best = expected[i - 1].topk(3).indices.tolist()
        assert {backbone.tokenizer.decode([t]) for t in best} <= set(top)
    if task == "scorer":  # sanity: the adapter changes what the prompt scores
        assert not torch.allclose(
            want, reference(reference_model, None, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-3
        )


def test_completion_logprobs_cover_echo_and_continuation_and_stream_alike(client, backbone, reference_model):
    whole = client.completions.create(model="base", prompt=TEXT, max_tokens=5, echo=True, logprobs=2, temperature=0)
    choice = whole.choices[0]
    ids = backbone.tokenizer.encode(TEXT)
    assert choice.text.startswith(TEXT) and len(choice.logprobs.tokens) == len(ids) + 5
    continuation = backbone.tokenizer.encode(choice.text[len(TEXT) :])
    expected = reference(reference_model, None, ids + continuation)
    for i in range(len(ids), len(ids) + 5):
        assert abs(choice.logprobs.token_logprobs[i] - expected[i - 1].max().item()) < TOLERANCE  # greedy: the top
    chunks = list(
        client.completions.create(
            model="base", prompt=TEXT, max_tokens=5, echo=True, logprobs=2, temperature=0, stream=True
        )
    )
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for lp in streamed for t in lp.tokens] == choice.logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == choice.logprobs.text_offset
    assert [v for lp in streamed for v in lp.token_logprobs] == pytest.approx(choice.logprobs.token_logprobs)


def test_chat_logprobs_with_top_alternatives_whole_and_streamed(client):
    chat = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4
    )
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content and len(content) == 6
    for token in content:
        assert len(token.top_logprobs) == 4 and token.top_logprobs[0].token == token.token  # greedy: the top one
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob) and token.logprob <= 0
        assert bytes(token.bytes).decode() == token.token
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    chunks = list(
        client.chat.completions.create(
            model="base", messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=4, stream=True
        )
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    plain = client.chat.completions.create(model="base", messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_native_logprobs_and_prompt_logprobs(http, backbone, reference_model):
    body = {"prompt": TEXT, "max_new_tokens": 3, "logprobs": True, "prompt_logprobs": True, "top_logprobs": 2}
    response = http.post("/v1/tasks/base/generate", json=body).json()
    ids = backbone.tokenizer.encode(TEXT)
    expected = reference(reference_model, None, ids + response["token_ids"])
    prompt = response["prompt_logprobs"]
    assert prompt[0] is None and [p["token_id"] for p in prompt[1:]] == ids[1:]
    assert abs(prompt[-1]["logprob"] - expected[len(ids) - 2, ids[-1]].item()) < TOLERANCE
    generated = response["logprobs"]
    assert [g["token_id"] for g in generated] == response["token_ids"]
    assert all(len(g["top_logprobs"]) == 2 and g["top_logprobs"][0]["token_id"] == g["token_id"] for g in generated)
    body_zero = {"prompt": TEXT, "max_new_tokens": 0, "prompt_logprobs": True}
    scored_only = http.post("/v1/tasks/base/generate", json=body_zero).json()
    assert scored_only["token_ids"] == [] and scored_only["usage"]["completion_tokens"] == 0
    assert [p["logprob"] for p in scored_only["prompt_logprobs"][1:]] == pytest.approx(
        [p["logprob"] for p in prompt[1:]]
    )
    with http.stream("POST", "/v1/tasks/base/generate", json={**body, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert '"prompt_logprobs"' in events[0] and all('"logprobs"' in e for e in events[:-1])
    plain = http.post("/v1/tasks/base/generate", json={"prompt": TEXT, "max_new_tokens": 2}).json()
    assert plain["logprobs"] is None and plain["prompt_logprobs"] is None


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("chat", {"messages": CHAT, "top_logprobs": 2}, None),
        ("chat", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_logprob_requests_are_bad_requests(client, route, body, param):
    create = client.completions.create if route == "completions" else client.chat.completions.create
    with pytest.raises(openai.BadRequestError) as caught:
        create(model="base", **body)
    if param is not None:
        assert caught.value.param == param
