"""vLLM's adapter routes through HTTP: load from a server path under the allowed roots only, serve it as a model
(PEFT's own tokens), unload; and tasks preloaded and pinned at start-up."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from peft_reference import make_adapter, peft_greedy
from transformers import AutoModelForCausalLM

from adapters_store import AdapterKey
from server.app import create_app
from server.config import Settings
from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

ADMIN = {"Authorization": "Bearer admin-key"}
KEYS = {"api_keys": "inference-key", "admin_keys": "admin-key"}


@pytest.fixture(scope="module")
def reference_model():
    return AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL).eval()


@pytest.fixture(scope="module")
def roots(tmp_path_factory, reference_model) -> dict[str, Path]:
    """An allowed root holding two adapters, and a directory outside it holding a third."""
    base = tmp_path_factory.mktemp("paths")
    root, outside = base / "adapters", base / "elsewhere"
    make_adapter(reference_model, "lora_qv", root / "greeter", seed=3)
    make_adapter(reference_model, "lora_qv", root / "greeter-v2", seed=4)
    make_adapter(reference_model, "lora_qv", outside / "secret", seed=5)
    (root / "link-out").symlink_to(outside / "secret")  # a directory symlink leaving the root
    (root / "half").mkdir()  # a directory whose weights are a symlink leaving the root
    (root / "half" / "adapter_config.json").write_bytes((root / "greeter" / "adapter_config.json").read_bytes())
    (root / "half" / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def http(backbone, roots):
    settings = Settings(store="memory://", adapter_roots=str(roots["root"]), **KEYS)
    with TestClient(create_app(settings, backbone=backbone)) as http:
        yield http


def load(http, name: str, path, **extra):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra}, headers=ADMIN)


def test_a_loaded_adapter_serves_as_a_model_with_peft_tokens(http, roots, backbone, reference_model):
    loaded = load(http, "greeter", roots["root"] / "greeter")
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="inference-key", http_client=http, max_retries=0)
    assert "greeter" in [m.id for m in client.models.list()]
    prompt = "Hello there, how"
    completion = client.completions.create(model="greeter", prompt=prompt, max_tokens=6, temperature=0)
    expected = peft_greedy(reference_model, roots["root"] / "greeter", backbone.tokenizer.encode(prompt), 6)
    assert completion.choices[0].text == backbone.tokenizer.decode(expected)
    base = client.completions.create(model="base", prompt=prompt, max_tokens=6, temperature=0)
    assert base.choices[0].text != completion.choices[0].text  # sanity: the adapter matters


def test_loading_again_replaces_only_when_asked(http, roots):
    assert load(http, "twice", roots["root"] / "greeter").status_code == 200
    same = load(http, "twice", roots["root"] / "greeter")
    assert same.status_code == 200 and "already loaded" in same.text
    refused = load(http, "twice", roots["root"] / "greeter-v2")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_name"
    replaced = load(http, "twice", roots["root"] / "greeter-v2", load_inplace=True)
    assert replaced.status_code == 200 and "version 2" in replaced.text
    assert http.get("/v1/tasks/twice", headers=ADMIN).json()["version"] == 2


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("{root}/../elsewhere/secret", 403),
        ("{outside}/secret", 403),
        ("{root}/link-out", 403),
        ("{root}/half", 403),
        ("greeter", 400),  # relative
        ("{root}/missing", 400),
        ("/", 403),
    ],
)
def test_no_path_escapes_the_roots(http, roots, path, status):
    response = load(http, "escapee", path.format(root=roots["root"], outside=roots["outside"]))
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/v1/tasks/escapee", headers=ADMIN).status_code == 404  # nothing stored


def test_admin_scope_and_unload(http, roots):
    inference = {"Authorization": "Bearer inference-key"}
    body = {"lora_name": "gone", "lora_path": str(roots["root"] / "greeter")}
    assert http.post("/v1/load_lora_adapter", json=body, headers=inference).status_code == 403
    assert load(http, "gone", roots["root"] / "greeter").status_code == 200
    unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "gone"}, headers=ADMIN)
    assert unloaded.status_code == 200 and "removed" in unloaded.text
    assert http.get("/v1/tasks/gone", headers=ADMIN).status_code == 404
    again = http.post("/v1/unload_lora_adapter", json={"lora_name": "gone"}, headers=ADMIN)
    assert again.status_code == 404 and again.json()["error"]["code"] == "model_not_found"
    bad = http.post("/v1/unload_lora_adapter", json={"lora_name": "gone", "extra": 1}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "extra"


def test_without_roots_loading_is_forbidden(backbone, roots):
    with TestClient(create_app(Settings(store="memory://"), backbone=backbone)) as http:
        response = load(http, "greeter", roots["root"] / "greeter")
    assert response.status_code == 403 and "adapter_roots" in response.json()["error"]["message"]


def test_preload_stores_and_pins_before_ready(backbone, roots):
    settings = Settings(store="memory://", preload=f"pre={roots['root'] / 'greeter'},base")
    with TestClient(create_app(settings, backbone=backbone)) as http:
        assert http.get("/ready").status_code == 200
        task = http.get("/v1/tasks/pre").json()
        assert task["resident"] is True and task["version"] == 1
        engine = http.app.state.engine
        assert engine.residency.is_resident(AdapterKey("pre", 1))


def test_a_preload_that_fails_fails_start_up(backbone):
    with TestClient(create_app(Settings(store="memory://", preload="no-such-task"), backbone=backbone)) as http:
        ready = http.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "failed" and "no-such-task" in ready.json()["detail"]
