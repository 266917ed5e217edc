"""Composite tasks and adapter_scale through HTTP, on the default model: uploads, listings, refusals, both APIs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from peft_reference import make_composite
from transformers import AutoModelForCausalLM

from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

PARTS = (("prefix", "prefix", 1.0), ("lora", "lora_ffn", 0.5))


@pytest.fixture(scope="module")
def composite_dir(tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL)
    return make_composite(model, PARTS, tmp_path_factory.mktemp("composite") / "mam", seed=4)


def folder_files(root: Path) -> dict[str, bytes]:
    """The upload as multipart files named `<component>/<file>`, beside task.json."""
    files = {"task.json": (root / "task.json").read_bytes()}
    for name, _, _ in PARTS:
        for base in ("adapter_config.json", "adapter_model.safetensors"):
            files[f"{name}/{base}"] = (root / name / base).read_bytes()
    return files


def upload(client, task_id: str, files: dict[str, bytes]):
    return client.post(f"/v1/tasks/{task_id}/versions", files=[("files", (n, d)) for n, d in files.items()])


def generate(client, task_id: str, **body):
    return client.post(f"/v1/tasks/{task_id}/generate", json={"prompt": "Name a river.", "max_new_tokens": 6, **body})


COMPONENTS = [
    {"name": "prefix", "kind": "prefix_tuning", "scale": 1.0},
    {"name": "lora", "kind": "lora", "scale": 0.5},
]


def test_a_composite_uploads_lists_and_generates(open_client, composite_dir):
    created = upload(open_client, "mam", folder_files(composite_dir))
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "composite" and created.json()["components"] == COMPONENTS
    listed = {t["task_id"]: t for t in open_client.get("/v1/tasks").json()["tasks"]}
    assert listed["mam"]["components"] == COMPONENTS
    assert open_client.get("/v1/tasks/mam").json()["components"] == COMPONENTS
    config = open_client.get("/console/api/tasks/mam/versions/1/config").json()  # the console's task page
    assert config["file"] == "task.json" and set(config["content"]) == {"task.json", "prefix", "lora"}
    assert config["content"]["lora"]["peft_type"] == "LORA"
    tuned, base = generate(open_client, "mam").json(), generate(open_client, "base").json()
    assert tuned["version"] == 1 and tuned["token_ids"] != base["token_ids"]
    # the same task as an archive of the directory: identical files, so nothing new is stored
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(composite_dir, arcname="mam")
    again = open_client.post("/v1/tasks/mam/versions", files={"archive": ("mam.tar.gz", buffer.getvalue())})
    assert again.status_code == 200 and again.json()["version"] == 1


def _config(files: dict[str, bytes], name: str, **changes) -> bytes:
    return json.dumps({**json.loads(files[f"{name}/adapter_config.json"]), **changes}).encode()


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (
            lambda f: {**f, "lora/adapter_config.json": _config(f, "lora", modules_to_save=["lm_head"])},
            ["'lora'", "modules_to_save"],
        ),
        (lambda f: {**f, "lora/adapter_model.safetensors": b"\0" * 16}, ["'lora'", "adapter_model.safetensors"]),
        (lambda f: {k: v for k, v in f.items() if not k.startswith("lora/")}, ["'lora'", "lora/adapter_config.json"]),
        (lambda f: {**f, "prefix/adapter_config.json": _config(f, "prefix", num_layers=3)}, ["'prefix'", "num_layers"]),
        (lambda f: {**f, "task.json": b'{"components": ["prefix", "lora", "prefix"]}'}, ["task.json", "twice"]),
        (lambda f: {**f, "task.json": b'{"components": [{"name": "lora", "scale": 3}]}'}, ["task.json", "scale"]),
        (
            lambda f: {
                **{k: v for k, v in f.items() if not k.startswith("lora/")},
                "task.json": b'{"components": ["prefix", "again"]}',
                "again/adapter_config.json": f["prefix/adapter_config.json"],
                "again/adapter_model.safetensors": f["prefix/adapter_model.safetensors"],
            },
            ["prompt-learning", "at most one"],
        ),
    ],
)
def test_a_bad_component_is_refused_naming_it_and_changes_nothing(open_client, composite_dir, mutate, fragments):
    before = open_client.get("/v1/tasks").json()
    response = upload(open_client, "refused-mix", mutate(folder_files(composite_dir)))
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert all(fragment in message for fragment in fragments), message
    assert open_client.get("/v1/tasks").json() == before


def test_adapter_scale_on_both_apis(open_client, composite_dir):
    files = {k.partition("/")[2]: v for k, v in folder_files(composite_dir).items() if k.startswith("lora/")}
    assert upload(open_client, "ffn-lora", files).status_code == 201
    prefix = {k.partition("/")[2]: v for k, v in folder_files(composite_dir).items() if k.startswith("prefix/")}
    assert upload(open_client, "prefix-only", prefix).status_code == 201
    base = generate(open_client, "base").json()["text"]
    assert generate(open_client, "ffn-lora").json()["text"] != base
    assert generate(open_client, "ffn-lora", adapter_scale=0).json()["text"] == base
    completion = {"prompt": "Name a river.", "max_tokens": 6, "temperature": 0}
    for route, body in (
        ("/v1/completions", completion),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 6}),
    ):
        body = {"temperature": 0, **body}
        plain = open_client.post(route, json={**body, "model": "base"}).json()
        scaled = open_client.post(route, json={**body, "model": "ffn-lora", "adapter_scale": 0})
        assert scaled.status_code == 200, scaled.text
        assert scaled.json()["choices"] == plain["choices"]
        for task, scale in (("ffn-lora", 2.5), ("prefix-only", 0.5)):
            refused = open_client.post(route, json={**body, "model": task, "adapter_scale": scale})
            assert refused.status_code == 400 and "adapter_scale" in refused.json()["error"]["message"], refused.text
    for task, scale in (("ffn-lora", -1), ("prefix-only", 0.5), ("base", 0.5)):
        refused = generate(open_client, task, adapter_scale=scale)
        assert refused.status_code == 400 and "adapter_scale" in refused.json()["error"]["message"], refused.text
