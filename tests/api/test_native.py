"""The native API through HTTP, on the default model: status, body, and the side effect."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from peft_reference import make_adapter
from transformers import AutoModelForCausalLM

from server.app import create_app
from server.config import Settings
from server.engine.backbone import DEFAULT_MODEL, Backbone, default_cache_dir


@pytest.fixture(scope="module")
def client():
    backbone = Backbone.load(DEFAULT_MODEL, device="cpu")
    settings = Settings(max_upload_bytes=8_000_000, store="memory://")
    with TestClient(create_app(settings, backbone=backbone)) as client:
        yield client


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL)
    return make_adapter(model, "lora_qv", tmp_path_factory.mktemp("lora") / "lora_qv", seed=3)


def upload(client: TestClient, task_id: str, files: dict[str, bytes]):
    return client.post(f"/v1/tasks/{task_id}/versions", files=[("files", (n, d)) for n, d in files.items()])


def peft_files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def with_config(files: dict[str, bytes], **changes) -> bytes:
    return json.dumps({**json.loads(files["adapter_config.json"]), **changes}).encode()


def generate(client: TestClient, task_id: str, **body):
    return client.post(f"/v1/tasks/{task_id}/generate", json={"max_new_tokens": 8, **body})


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"


def test_generate_base_with_prompt_and_messages(client):
    body = generate(client, "base", prompt="The capital of France is").json()
    assert body["task_id"] == "base" and body["version"] is None
    assert body["usage"]["completion_tokens"] == len(body["token_ids"]) > 0
    chat = generate(client, "base", messages=[{"role": "user", "content": "Say hello."}]).json()
    assert chat["finish_reason"] in ("stop", "length") and chat["text"]


def test_upload_then_generate_uses_the_task(client, lora_dir):
    created = upload(client, "greeter", peft_files(lora_dir))
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1 and created.json()["kind"] == "lora"
    assert client.get("/v1/tasks/greeter").json()["version"] == 1
    prompt = "Write one sentence about rivers."
    tuned = generate(client, "greeter", prompt=prompt).json()
    base = generate(client, "base", prompt=prompt).json()
    assert tuned["version"] == 1 and tuned["token_ids"] != base["token_ids"]
    described = client.post(
        "/v1/tasks/greeter/versions",
        files=[("files", f) for f in peft_files(lora_dir).items()],
        data={"description": "the same files, now described"},
    )
    assert described.status_code == 201 and described.json()["version"] == 2
    assert generate(client, "greeter", prompt=prompt).json()["version"] == 2


def test_stream_sends_deltas_then_the_end(client):
    body = {"prompt": "Hi", "max_new_tokens": 5, "stream": True}
    with client.stream("POST", "/v1/tasks/base/generate", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    deltas, end = events[:-1], events[-1]
    assert sum(len(d["token_ids"]) for d in deltas) == end["usage"]["completion_tokens"] == 5
    assert end["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "x", "top_p": 3}, "top_p"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 100_000}, "max_new_tokens"),
        ({"prompt": "x " * 9000}, "context length"),
        ({"prompt": "x", "stop": [""]}, "stop"),
    ],
)
def test_bad_generate_requests_are_400_with_a_reason(client, body, fragment):
    response = generate(client, "base", **body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"
    assert fragment in response.json()["error"]["message"]


def test_unknown_task_is_404(client):
    response = generate(client, "no-such-task", prompt="x")
    assert response.status_code == 404 and response.json()["error"]["type"] == "unknown_task"


@pytest.mark.parametrize(
    ("mutate", "status", "fragment"),
    [
        (lambda f: {"adapter_config.json": f["adapter_config.json"]}, 422, "adapter_model.safetensors"),
        (lambda f: {"adapter_config.json": f["adapter_config.json"], "adapter_model.bin": b"\x80\x04"}, 422, "pickle"),
        (lambda f: {**f, "adapter_config.json": b"{not json"}, 422, "JSON"),
        (lambda f: {**f, "adapter_model.safetensors": f["adapter_model.safetensors"][:100]}, 422, "safetensors"),
        (lambda f: {**f, "adapter_config.json": with_config(f, use_dora=True)}, 422, "lora_magnitude_vector"),
        (lambda f: {**f, "adapter_config.json": with_config(f, modules_to_save=["lm_head"])}, 422, "modules_to_save"),
        (lambda f: {**f, "padding.bin": b"0" * 9_000_000}, 413, "limit"),
    ],
)
def test_bad_uploads_are_refused_and_change_nothing(client, lora_dir, mutate, status, fragment):
    before = client.get("/v1/tasks").json()
    response = upload(client, "refused", mutate(peft_files(lora_dir)))
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert client.get("/v1/tasks").json() == before
    assert client.get("/v1/tasks/refused").status_code == 404


def test_delete_task(client, lora_dir):
    assert upload(client, "short-lived", peft_files(lora_dir)).status_code == 201
    assert client.delete("/v1/tasks/short-lived").status_code == 204
    assert generate(client, "short-lived", prompt="x").status_code == 404
    assert client.delete("/v1/tasks/short-lived").status_code == 404


def test_archive_upload_rollback_and_task_info(client, lora_dir):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(lora_dir / name, arcname=f"my-adapter/{name}")
    created = client.post("/v1/tasks/archived/versions", files={"archive": ("a.tar.gz", buffer.getvalue())})
    assert created.status_code == 201, created.text
    files = [("files", f) for f in peft_files(lora_dir).items()]
    assert client.post("/v1/tasks/archived/versions", files=files, data={"description": "v2"}).json()["version"] == 2
    info = client.get("/v1/tasks/archived").json()
    assert info["version"] == 2 and [v["version"] for v in info["versions"]] == [1, 2]
    assert info["resident"] is False  # an upload waits in the host tier: its first request brings it to the device
    assert client.post("/v1/tasks/archived/rollback", json={"version": 1}).json()["version"] == 1
    assert generate(client, "archived", prompt="Hi").json()["version"] == 1
    assert client.get("/v1/tasks/archived").json()["resident"] is True
    missing = client.post("/v1/tasks/archived/rollback", json={"version": 9})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "unknown_version"


def test_an_adapter_that_can_never_fit_the_device_is_refused_naming_the_budget(backbone, lora_dir):
    settings = Settings(store="memory://", device_adapter_bytes=4096)
    with TestClient(create_app(settings, backbone=backbone)) as small:
        refused = upload(small, "huge", peft_files(lora_dir))
        assert refused.status_code == 422 and refused.json()["error"]["type"] == "invalid_adapter"
        assert "device adapter budget of 4096 bytes" in refused.json()["error"]["message"]
        assert small.get("/v1/tasks/huge").status_code == 404  # nothing stored


def test_list_pages_through_tasks_in_order(client, lora_dir):
    for name in ("page-a", "page-b", "page-c"):
        assert upload(client, name, peft_files(lora_dir)).status_code == 201
    first = client.get("/v1/tasks", params={"after": "page-", "limit": 2}).json()
    assert [t["task_id"] for t in first["tasks"]] == ["page-a", "page-b"]
    second = client.get("/v1/tasks", params={"after": first["next_after"], "limit": 2}).json()
    assert second["tasks"][0]["task_id"] == "page-c"


def test_template_task_wraps_the_prompt(client):
    template = {
        "instruction": "Answer with the capital city only.",
        "examples": [{"input": "Germany", "output": "Berlin"}, {"input": "Italy", "output": "Rome"}],
        "input_prefix": "Country: ",
        "input_suffix": "\nCapital:",
    }
    created = client.post("/v1/tasks/capitals/versions", json={"template": template})
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "template" and created.json()["parameters"] == 0
    answer = generate(client, "capitals", prompt="France", max_new_tokens=3).json()
    assert "Paris" in answer["text"]
    bad = client.post("/v1/tasks/bad-template/versions", json={"template": {"examples": [{"input": 1}]}})
    assert bad.status_code == 422 and "template.json" in bad.json()["error"]["message"]


def test_a_request_may_name_an_earlier_version_while_the_current_one_serves_the_rest(client):
    """What the console's playground compares: one task's two versions side by side, nothing rolled back."""
    first = {"input_prefix": "Question: ", "input_suffix": "\nAnswer:"}
    second = {"input_prefix": "Answer in one long, detailed sentence. Question: ", "input_suffix": "\nAnswer:"}
    assert client.post("/v1/tasks/versioned/versions", json={"template": first}).status_code == 201
    old = generate(client, "versioned", prompt="Sky colour?", max_new_tokens=6).json()
    assert client.post("/v1/tasks/versioned/versions", json={"template": second}).status_code == 201
    new = generate(client, "versioned", prompt="Sky colour?", max_new_tokens=6).json()
    pinned = generate(client, "versioned", prompt="Sky colour?", max_new_tokens=6, version=1).json()
    assert (new["version"], pinned["version"]) == (2, 1)
    assert new["usage"]["prompt_tokens"] != old["usage"]["prompt_tokens"]
    assert (pinned["token_ids"], pinned["usage"]) == (old["token_ids"], old["usage"])
    assert client.get("/v1/tasks/versioned").json()["version"] == 2  # naming a version changes nothing
    missing = generate(client, "versioned", prompt="x", version=9)
    assert missing.status_code == 404 and "has no version 9 (it keeps 1, 2)" in missing.json()["error"]["message"]
    assert generate(client, "base", prompt="x", version=1).status_code == 404
    assert generate(client, "versioned", prompt="x", version=0).status_code == 400


def test_an_adapter_with_a_prompt_format_wraps_each_prompt(client, lora_dir):
    """template.json beside the adapter: every route feeds the model `prompt + "\n"`, as the trainer trained it."""
    files = {**peft_files(lora_dir), "template.json": b'{"input_suffix": "\\n"}'}
    assert upload(client, "formatted", files).status_code == 201
    assert upload(client, "unformatted", peft_files(lora_dir)).status_code == 201
    plain = generate(client, "unformatted", prompt="Rivers").json()
    wrapped = generate(client, "formatted", prompt="Rivers").json()
    assert wrapped["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + 1  # the "\n" token
    body = {"model": "formatted", "prompt": "Rivers", "max_tokens": 8, "temperature": 0}
    completion = client.post("/v1/completions", json=body).json()
    assert completion["choices"][0]["text"] == wrapped["text"]
    assert completion["usage"]["prompt_tokens"] == wrapped["usage"]["prompt_tokens"]
    refused = upload(client, "formatted", {**files, "template.json": b'{"instruction": "Be brief."}'})
    assert refused.status_code == 422 and "input_prefix and input_suffix" in refused.json()["error"]["message"]


@pytest.mark.parametrize("task_id", ["base", "-leading-dash", "x" * 200, "sp ace"])
def test_invalid_task_ids_are_refused(client, lora_dir, task_id):
    response = upload(client, task_id, peft_files(lora_dir))
    assert response.status_code in (400, 404), response.text
