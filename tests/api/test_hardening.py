"""Hostile and malformed input, in process: each gets a clear 4xx in the documented shape and changes nothing."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient
from peft_reference import make_adapter
from transformers import AutoModelForCausalLM

from server.app import create_app
from server.config import Settings
from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

RAW_JSON = {"content-type": "application/json"}
MULTIPART = "multipart/form-data; boundary=x"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory) -> dict[str, bytes]:
    model = AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL)
    path = make_adapter(model, "lora_qv", tmp_path_factory.mktemp("lora") / "lora", seed=5)
    return {name: (path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def upload(client: TestClient, task_id: str, files: dict[str, bytes], **data):
    return client.post(f"/v1/tasks/{task_id}/versions", files=[("files", f) for f in files.items()], data=data)


def assert_error(response, status: int, kind: str, fragment: str = "") -> dict:
    """The native error shape, exactly."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind and fragment in body["error"]["message"], body
    return body["error"]


def assert_openai_error(response, status: int, param: str | None, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param and fragment in error["message"], error
    return error


# --- sampling values that would break sampling --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 3, "temperature": 1e-39}),
        ("/v1/chat/completions", {"model": "base", "messages": CHAT, "max_tokens": 3, "temperature": 5e-324}),
        ("/v1/tasks/base/generate", {"prompt": "hi", "max_new_tokens": 3, "temperature": 1.0, "top_p": 1e-300}),
        ("/v1/tasks/base/generate", {"prompt": "hi", "max_new_tokens": 3, "temperature": 1e-39, "top_k": 2**31 - 1}),
    ],
)
def test_tiny_temperatures_and_top_p_sample_instead_of_failing(open_client, path, body):
    """Values inside the documented ranges that overflow float32 are raised to a floor that samples the same."""
    answers = [open_client.post(path, json={**body, "seed": 1}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert text_of(answers[0].json()) == text_of(answers[1].json())  # seeded: the same draw


def text_of(body: dict) -> str:
    if "text" in body:
        return body["text"]
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/tasks/base/generate", b'{"prompt": "hi", "temperature": Infinity}', "temperature"),
        ("/v1/tasks/base/generate", b'{"prompt": "hi", "temperature": 1e308}', "temperature"),
        ("/v1/tasks/base/generate", b'{"prompt": "hi", "top_p": NaN}', "top_p"),
        ("/v1/tasks/base/generate", b'{"prompt": "hi", "seed": 1180591620717411303424}', "seed"),
        ("/v1/tasks/base/generate", b'{"prompt": "hi", "top_k": 1180591620717411303424}', "top_k"),
    ],
)
def test_values_sampling_cannot_use_are_400_naming_the_field(open_client, path, raw, field):
    assert_error(open_client.post(path, content=raw, headers=RAW_JSON), 400, "invalid_request", field)


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/chat/completions", {"model": "base", "messages": CHAT, "seed": 2**70}, "seed"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "seed": -(2**64)}, "seed"),
        ("/v1/completions", {"model": "base", "prompt": "hi", "temperature": 2.5}, "temperature"),
    ],
)
def test_openai_routes_refuse_out_of_range_values_naming_the_param(open_client, path, raw, field):
    assert_openai_error(open_client.post(path, json=raw), 400, field, field)


def test_infinity_on_an_openai_route_names_the_param(open_client):
    raw = b'{"model": "base", "prompt": "hi", "top_p": -Infinity}'
    assert_openai_error(open_client.post("/v1/completions", content=raw, headers=RAW_JSON), 400, "top_p")


# --- lone surrogates -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "where"),
    [
        ("/v1/tasks/base/generate", b'{"prompt": "x\\ud800y"}', "prompt"),
        ("/v1/tasks/base/generate", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages.0.content"),
        ("/v1/tasks/base/generate", b'{"prompt": "x", "stop": ["\\ud800"]}', "stop.0"),
        ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
        ("/v1/completions", b'{"model": "base", "prompt": "\\ud800"}', "prompt"),
    ],
)
def test_lone_surrogates_in_prompts_and_messages_are_400(open_client, path, raw, where):
    response = open_client.post(path, content=raw, headers=RAW_JSON)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "lone surrogate" in error["message"] and (where is None or where in error["message"])


def test_a_lone_surrogate_in_a_description_or_template_is_refused_and_never_stored(open_client):
    before = open_client.get("/v1/tasks").json()
    bodies = [
        b'{"template": {"instruction": "Answer."}, "description": "bad \\ud800 text"}',
        b'{"template": {"instruction": "Answer \\udc00."}}',
        b'{"template": {"examples": [{"input": "a", "output": "\\ud800"}]}}',
    ]
    for raw in bodies:
        response = open_client.post("/v1/tasks/surrogate/versions", content=raw, headers=RAW_JSON)
        assert_error(response, 400, "invalid_request", "lone surrogate")
    assert open_client.get("/v1/tasks").json() == before
    assert open_client.get("/v1/tasks/surrogate").status_code == 404


# --- nesting and padding ---------------------------------------------------------------------------------------------


def safetensors_with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


@pytest.mark.parametrize(
    ("replace", "fragment"),
    [
        ({"adapter_config.json": b"[" * 200_000}, "adapter_config.json is not valid JSON"),
        ({"adapter_model.safetensors": safetensors_with_header(b"[" * 200_000)}, "not valid JSON"),
        ({"adapter_model.safetensors": safetensors_with_header(b"{}" + b" " * (2 << 20))}, "header is"),
    ],
)
def test_deeply_nested_or_padded_adapter_files_are_422(open_client, peft_files, replace, fragment):
    response = upload(open_client, "nested", {**peft_files, **replace})
    assert_error(response, 422, "invalid_adapter", fragment)
    assert open_client.get("/v1/tasks/nested").status_code == 404


@pytest.mark.parametrize("path", ["/v1/tasks/base/generate", "/v1/tasks/deep/versions", "/v1/completions"])
def test_deeply_nested_json_bodies_are_400(open_client, path):
    response = open_client.post(path, content=b"[" * 200_000, headers=RAW_JSON)
    assert response.status_code == 400, response.text
    assert "error" in response.json() and "recursion" in response.text


# --- the framework's own errors, in the documented shape --------------------------------------------------------------


def test_unparsable_json_is_400_without_a_character_offset_for_a_field(open_client):
    truncated = b'{"prompt": "hi", "max_new'
    error = assert_error(
        open_client.post("/v1/tasks/base/generate", content=truncated, headers=RAW_JSON), 400, "invalid_request"
    )
    assert error["message"].startswith("the body is not valid JSON")
    response = open_client.post("/v1/completions", content=b'{"model": "base", "pro', headers=RAW_JSON)
    assert assert_openai_error(response, 400, None)["code"] == "invalid_request"


def test_unknown_routes_methods_and_broken_multipart_answer_in_the_documented_shape(open_client):
    assert_error(open_client.get("/v2/nothing"), 404, "not_found", "/docs")
    assert_error(open_client.put("/v1/tasks/base/generate", json={}), 405, "method_not_allowed", "POST")
    assert open_client.put("/v1/tasks/base/generate", json={}).headers["allow"] == "POST"
    assert_openai_error(open_client.get("/v1/chat/completions"), 405, None, "GET is not allowed")
    multipart = {"content-type": "multipart/form-data"}  # no boundary
    assert_error(
        open_client.post("/v1/tasks/t/versions", content=b"--x\r\n", headers=multipart), 400, "invalid_request"
    )


def test_an_unexpected_failure_is_a_500_in_the_documented_shape(backbone, monkeypatch):
    def broken(self, **_):
        raise RuntimeError("a bug")

    monkeypatch.setattr("adapters_store.memory.MemoryStore.list", broken)
    app = create_app(Settings(store="memory://"), backbone=backbone)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_error(client.get("/v1/tasks"), 500, "internal", "server log")


# --- body limits and timeouts -----------------------------------------------------------------------------------------


def asgi_call(app, path: str, headers: dict[str, str], chunks, *, hang: bool = False) -> tuple[int, dict, int]:
    """Call the app straight through ASGI: (status, JSON body, body chunks it read)."""
    reads = 0
    sent: list[dict] = []

    async def receive():
        nonlocal reads
        if reads < len(chunks):
            reads += 1
            return {"type": "http.request", "body": chunks[reads - 1], "more_body": reads < len(chunks) or hang}
        await asyncio.sleep(3600 if hang else 0)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), reads


@pytest.fixture(scope="module")
def bare_app():
    """No lifespan: bodies are read (and bounded) before a route needs the engine."""
    settings = Settings(store="memory://", max_request_bytes=1000, max_upload_bytes=5000, body_idle_timeout=0.3)
    return create_app(settings)


@pytest.mark.parametrize(
    ("path", "declared"),
    [("/v1/tasks/base/generate", 1001), ("/v1/completions", 10**12), ("/v1/tasks/t/versions", 2 << 30)],
)
def test_a_declared_oversize_body_is_413_before_a_byte_is_read(bare_app, path, declared):
    headers = {"content-type": MULTIPART if "versions" in path else "application/json", "content-length": str(declared)}
    status, body, reads = asgi_call(bare_app, path, headers, [b"{"])
    assert status == 413 and reads == 0
    assert body["error"]["type" if "tasks" in path else "code"] == "payload_too_large"


def test_an_undeclared_oversize_body_is_cut_while_streaming(bare_app):
    chunks = [b"x" * 4000] * 1000  # 4 MB offered, chunked
    status, body, reads = asgi_call(bare_app, "/v1/tasks/base/generate", {"content-type": "application/json"}, chunks)
    assert status == 413 and reads == 1
    part = b'--x\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n'
    status, body, reads = asgi_call(bare_app, "/v1/tasks/t/versions", {"content-type": MULTIPART}, [part, *chunks])
    assert status == 413 and reads == (5000 + (1 << 20)) // 4000 + 2  # the upload limit plus the multipart slack


def test_a_stalled_body_is_408(bare_app):
    started = time.monotonic()
    status, body, _ = asgi_call(
        bare_app, "/v1/tasks/base/generate", {"content-type": "application/json"}, [b"{"], hang=True
    )
    assert status == 408 and body["error"]["type"] == "request_timeout"
    assert time.monotonic() - started < 5


# --- identical uploads ------------------------------------------------------------------------------------------------


def test_an_upload_identical_to_the_current_version_returns_it(open_client, peft_files):
    first = upload(open_client, "same", peft_files)
    assert first.status_code == 201
    again = upload(open_client, "same", peft_files)
    assert again.status_code == 200 and again.json() == first.json()
    assert [v["version"] for v in open_client.get("/v1/tasks/same").json()["versions"]] == [1]
    described = upload(open_client, "same", peft_files, description="now with notes")
    assert described.status_code == 201 and described.json()["version"] == 2
    template = {"template": {"instruction": "Say yes."}}
    assert open_client.post("/v1/tasks/same-t/versions", json=template).status_code == 201
    assert open_client.post("/v1/tasks/same-t/versions", json=template).status_code == 200
