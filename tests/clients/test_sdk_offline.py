"""The SDK without a server: request building, error mapping, stream decoding and the local upload checks,
through `httpx.MockTransport`. The sync and async clients must build identical requests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from clients import (
    AsyncClient,
    Client,
    ConnectionLost,
    InvalidAdapter,
    InvalidRequest,
    Message,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServerError,
    StoreUnavailable,
    TaskserveError,
    Unavailable,
    UnknownTask,
    UnknownVersion,
)

GENERATION = {
    "task_id": "t",
    "version": 3,
    "text": "hi",
    "token_ids": [1, 2],
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 4, "completion_tokens": 2},
}


def recording(handler=None):
    """A transport that records each request and answers with `handler(request)` (a generation by default)."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request) if handler else httpx.Response(200, json=GENERATION)

    return seen, handle


def refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"nothing should be sent, but {request.method} {request.url} was")


def test_generate_request(monkeypatch):
    monkeypatch.setenv("TASKSERVE_URL", "http://example.test:9000/")
    monkeypatch.setenv("TASKSERVE_API_KEY", "sekret")
    seen, handle = recording()
    with Client(transport=httpx.MockTransport(handle)) as client:
        result = client.generate("my-task", "Hello", max_new_tokens=5, stop="\n", seed=None)
        client.chat("my-task", [Message(role="user", content="Hi")], temperature=0.5)
    assert result.version == 3 and result.usage.completion_tokens == 2
    request = seen[0]
    assert str(request.url) == "http://example.test:9000/v1/tasks/my-task/generate"
    assert request.headers["X-Task-Id"] == "my-task"
    assert request.headers["Authorization"] == "Bearer sekret"
    assert json.loads(request.content) == {"prompt": "Hello", "max_new_tokens": 5, "stop": ["\n"]}  # None: left out
    assert json.loads(seen[1].content) == {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.5}


def test_arguments_are_checked_before_sending():
    with Client("http://x.test", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(TypeError, match="stream"):
            client.generate("t", "hi", stream=True)
        with pytest.raises(InvalidRequest):
            client.generate("t", prompt="a", messages=[{"role": "user", "content": "b"}])
        with pytest.raises(InvalidRequest, match="reserved"):
            client.upload_template("base", {"instruction": "x"})
    with pytest.raises(InvalidRequest, match="http"):
        Client("localhost:8000")


async def test_sync_and_async_build_the_same_requests(tmp_path: Path):
    (tmp_path / "template.json").write_text(json.dumps({"instruction": "Be brief."}))
    sync_seen, sync_handle = recording()
    async_seen, async_handle = recording()
    with Client("http://x.test", "k", transport=httpx.MockTransport(sync_handle)) as client:
        client.generate("t", "hi", top_k=3)
        with pytest.raises(ServerError):  # the fake answer is a generation, not a version: refused as malformed
            client.upload("t", tmp_path, description="d")
    async with AsyncClient("http://x.test", "k", transport=httpx.MockTransport(async_handle)) as client:
        await client.generate("t", "hi", top_k=3)
        with pytest.raises(ServerError):
            await client.upload("t", tmp_path, description="d")
    assert len(sync_seen) == len(async_seen) == 2
    for a, b in zip(sync_seen, async_seen):
        assert (a.method, a.url) == (b.method, b.url)
        same = {k: v for k, v in a.headers.items() if k not in ("content-type", "content-length")}
        assert same == {k: v for k, v in b.headers.items() if k not in ("content-type", "content-length")}
    assert json.loads(sync_seen[0].content) == json.loads(async_seen[0].content) == {"prompt": "hi", "top_k": 3}
    # a directory holding a template.json is sent as the API's JSON template upload
    expected = {"template": {"instruction": "Be brief."}, "description": "d"}
    assert json.loads(sync_seen[1].content) == json.loads(async_seen[1].content) == expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, {"error": {"type": "invalid_request", "message": "m"}}, InvalidRequest),
        (404, {"error": {"type": "unknown_task", "message": "m"}}, UnknownTask),
        (404, {"error": {"type": "unknown_version", "message": "m"}}, UnknownVersion),
        (404, {"error": {"type": "something_new", "message": "m"}}, NotFound),  # unknown type: by status
        (413, {"error": {"type": "payload_too_large", "message": "m"}}, PayloadTooLarge),
        (422, {"error": {"type": "invalid_adapter", "message": "m"}}, InvalidAdapter),
        (429, {"error": {"type": "queue_full", "message": "m"}}, QueueFull),
        (503, {"error": {"type": "store_unavailable", "message": "m"}}, StoreUnavailable),
        (502, None, Unavailable),  # a proxy's HTML page
        (500, {"error": {"type": "internal", "message": "m"}}, ServerError),
        (418, None, ServerError),
    ],
)
def test_errors_map_to_types(status, body, expected):
    def answer(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, text="<html>bad gateway</html>")
        return httpx.Response(status, json=body, headers={"Retry-After": "2"})

    with Client("http://x.test", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(expected) as caught:
            client.generate("t", "hi")
    error = caught.value
    assert isinstance(error, TaskserveError) and error.status == status
    assert type(error) is expected
    if body is None:
        assert str(status) in str(error)
    else:
        assert str(error) == "m" and error.retry_after == 2.0


def _sse(*chunks: str) -> httpx.Response:
    return httpx.Response(200, text="".join(chunks), headers={"content-type": "text/event-stream"})


def test_stream_decoding():
    body = (
        ": keep-alive\n\n",
        'data: {"text": "Hel", "token_ids": [1]}\n\n',
        'data: {"text": "lo", "token_ids": [2]}\n\n',
        'data: {"task_id": "t", "version": 1, "finish_reason": "length", "usage": '
        '{"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
    )
    with Client("http://x.test", transport=httpx.MockTransport(lambda r: _sse(*body))) as client:
        events = list(client.stream("t", "hi"))
    assert [e.text for e in events] == ["Hel", "lo", ""]
    assert events[-1].is_final and events[-1].usage.completion_tokens == 2 and events[-1].version == 1


def test_stream_errors():
    failing = ('data: {"text": "a", "token_ids": [1]}\n\n', 'event: error\ndata: {"error": {"type": "internal", ')
    failing += ('"message": "generation failed: boom"}}\n\n',)
    with Client("http://x.test", transport=httpx.MockTransport(lambda r: _sse(*failing))) as client:
        events = client.stream("t", "hi")
        assert next(events).text == "a"
        with pytest.raises(ServerError, match="boom"):
            next(events)
    cut = ('data: {"text": "a", "token_ids": [1]}\n\n',)
    with Client("http://x.test", transport=httpx.MockTransport(lambda r: _sse(*cut))) as client:
        with pytest.raises(ConnectionLost):
            list(client.stream("t", "hi"))


async def test_async_stream_errors():
    answer = httpx.Response(404, json={"error": {"type": "unknown_task", "message": "unknown task 't'"}})
    async with AsyncClient("http://x.test", transport=httpx.MockTransport(lambda r: answer)) as client:
        with pytest.raises(UnknownTask, match="unknown task"):
            async for _ in client.stream("t", "hi"):
                pass


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_bad_uploads_fail_locally(tmp_path: Path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    escaping = tmp_path / "escaping.tar.gz"
    escaping.write_bytes(_tar({"../adapter_config.json": b"{}"}))
    unserved = tmp_path / "unserved"
    unserved.mkdir()
    (unserved / "adapter_config.json").write_text('{"peft_type": "BOFT"}')
    (unserved / "adapter_model.safetensors").write_bytes(b"x" * 16)
    bad_template = tmp_path / "bad.json"
    bad_template.write_text(json.dumps({"template": {"instruction": "x", "shots": []}}))
    cases = [
        (pickled, InvalidAdapter, "safe_serialization=True"),
        (escaping, InvalidAdapter, ".."),
        (unserved, InvalidAdapter, "BOFT"),
        (bad_template, InvalidAdapter, "shots"),
        (tmp_path / "missing", InvalidAdapter, "no such file"),
        (tmp_path, InvalidAdapter, "adapter_config.json"),  # a directory with no adapter in it
    ]
    with Client("http://x.test", transport=httpx.MockTransport(refuse)) as client:
        for source, error, fragment in cases:
            with pytest.raises(error, match=fragment.replace(".", r"\.")) as caught:
                client.upload("t", source)
            assert caught.value.status is None, source
        with pytest.raises(InvalidAdapter, match="examples"):
            client.upload_template("t", {"examples": "not a list"})
    with Client("http://x.test", transport=httpx.MockTransport(refuse), max_upload_bytes=8) as client:
        with pytest.raises(PayloadTooLarge):
            client.upload("t", unserved)


def test_peft_directory_goes_as_multipart_files(tmp_path: Path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1}')
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(1, 4)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "README.md").write_text("not sent")
    version = {"task_id": "t", "version": 1, "kind": "lora", "parameters": 4, "bytes": 16, "sha256": "ab"}
    seen, handle = recording(lambda request: httpx.Response(201, json={**version, "created_at": 1.0}))
    with Client("http://x.test", transport=httpx.MockTransport(handle)) as client:
        created = client.upload("t", tmp_path, description="first")
    assert (created.version, created.kind, created.description) == (1, "lora", None)
    body = seen[0].content
    assert seen[0].headers["content-type"].startswith("multipart/form-data")
    assert b'name="files"; filename="adapter_config.json"' in body
    assert b'name="files"; filename="adapter_model.safetensors"' in body
    assert b'name="description"' in body and b"not sent" not in body


def test_ready_is_false_while_the_server_loads():
    answer = httpx.Response(503, json={"status": "loading"})
    with Client("http://x.test", transport=httpx.MockTransport(lambda r: answer)) as client:
        readiness = client.ready()
    assert (readiness.ready, readiness.status) == (False, "loading")
