"""The SDK against a real server: generate, stream, uploads of every shape, listing, rollback, delete, errors."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from client_helpers import ADMIN_KEY, INFERENCE_KEY
from safetensors.torch import save_file

from clients import (
    AsyncClient,
    Client,
    Forbidden,
    InvalidAdapter,
    InvalidRequest,
    ServerUnreachable,
    Unauthorized,
    UnknownTask,
    UnknownVersion,
)

PROMPT = "The capital of France is"
CAPITALS = {
    "instruction": "Answer with the capital city only.",
    "examples": [{"input": "Germany", "output": "Berlin"}, {"input": "Italy", "output": "Rome"}],
    "input_prefix": "Country: ",
    "input_suffix": "\nCapital:",
}


def _lora_parameters(lora_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(lora_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_slice(name).get_shape()[0] * f.get_slice(name).get_shape()[1] for name in f.keys())


def _archive(lora_dir: Path, suffix: str) -> bytes:
    """The adapter directory as a .tar.gz or .zip, its files in one folder."""
    buffer = io.BytesIO()
    names = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    if suffix == ".zip":
        with zipfile.ZipFile(buffer, "w") as zf:
            for name in names:
                zf.write(lora_dir / name, f"adapter/{name}")
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name in names:
                tar.add(lora_dir / name, f"adapter/{name}")
    return buffer.getvalue()


def test_generate_and_stream_give_the_same_tokens(client: Client):
    whole = client.generate("base", PROMPT, max_new_tokens=8)
    assert whole.task_id == "base" and whole.version is None
    assert 0 < len(whole.token_ids) == whole.usage.completion_tokens <= 8

    events = list(client.stream("base", PROMPT, max_new_tokens=8))
    assert events[-1].is_final and not any(e.is_final for e in events[:-1])
    assert "".join(e.text for e in events) == whole.text
    assert [t for e in events for t in e.token_ids] == whole.token_ids
    assert (events[-1].finish_reason, events[-1].usage) == (whole.finish_reason, whole.usage)


def test_chat_and_stop(client: Client):
    answer = client.chat("base", "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer.text
    stopped = client.generate("base", PROMPT, max_new_tokens=32, stop=" ", ignore_eos=True)
    assert stopped.finish_reason == "stop" and " " not in stopped.text.strip()


def test_upload_directory_archives_and_peft_model(client: Client, lora_dir: Path, lora_model, tmp_path: Path):
    task = "sdk-lora"
    created = client.upload(task, lora_dir, description="from a directory")
    assert (created.task_id, created.version, created.kind) == (task, 1, "lora")
    assert created.description == "from a directory"
    assert created.parameters == _lora_parameters(lora_dir)

    # the same files, however they travel, are the current version again: nothing is stored
    for suffix in (".tar.gz", ".zip"):
        path = tmp_path / f"adapter{suffix}"
        path.write_bytes(_archive(lora_dir, suffix))
        again = client.upload(task, path)
        assert (again.version, again.unchanged, again.sha256) == (1, True, created.sha256)
    from_model = client.upload(task, lora_model)
    assert (from_model.version, from_model.unchanged, from_model.parameters) == (1, True, created.parameters)
    assert not created.unchanged and [v.version for v in client.task(task).versions] == [1]

    described = client.upload(task, lora_model, description="the same weights, described")
    assert (described.version, described.unchanged, described.sha256) == (2, False, created.sha256)
    base = client.generate("base", PROMPT, max_new_tokens=8)
    tuned = client.generate(task, PROMPT, max_new_tokens=8)
    assert tuned.version == 2 and tuned.token_ids != base.token_ids  # the adapter is applied


def test_templates_from_a_dict_and_a_file(client: Client, tmp_path: Path):
    created = client.upload_template("sdk-capitals", CAPITALS, description="few-shot")
    assert (created.kind, created.parameters, created.description) == ("template", 0, "few-shot")
    assert "Paris" in client.generate("sdk-capitals", "France", max_new_tokens=4).text

    path = tmp_path / "capitals.json"
    path.write_text(json.dumps({"template": CAPITALS, "description": "from a file"}))
    again = client.upload("sdk-capitals", path)
    assert (again.version, again.description) == (2, "from a file")


def test_tasks_iterates_every_page(client: Client):
    names = ["sdk-page-a", "sdk-page-b", "sdk-page-c"]
    for name in names:
        client.upload_template(name, CAPITALS)
    listed = [v.task_id for v in client.tasks(page_size=1)]
    assert listed == sorted(listed) and set(names) <= set(listed)
    assert [v.task_id for v in client.tasks()] == listed


def test_rollback_and_delete(client: Client, lora_dir: Path):
    task = "sdk-rollback"
    client.upload(task, lora_dir)
    client.upload_template(task, CAPITALS)
    assert client.task(task).kind == "template"
    back = client.rollback(task, 1)
    assert (back.version, back.kind) == (1, "lora")
    assert client.task(task).version == 1
    with pytest.raises(UnknownVersion):
        client.rollback(task, 99)
    assert client.generate(task, "France", max_new_tokens=2, version=2).version == 2  # v1 stays current
    assert client.task(task).version == 1
    with pytest.raises(UnknownVersion):
        client.generate(task, PROMPT, version=99)
    client.delete(task)
    with pytest.raises(UnknownTask) as caught:
        client.task(task)
    assert caught.value.status == 404 and task in str(caught.value)
    with pytest.raises(UnknownTask):
        client.generate(task, PROMPT)


def test_server_errors_are_typed(client: Client, live, closed_url: str, tmp_path: Path, monkeypatch):
    with pytest.raises(UnknownTask):
        next(client.stream("sdk-no-such-task", PROMPT))
    with pytest.raises(InvalidRequest) as caught:
        client.generate("base", PROMPT, max_new_tokens=0)
    assert caught.value.status == 400 and "max_new_tokens" in str(caught.value)

    # PEFT files that are well-formed but do not fit the backbone: refused by the server, not by the local checks
    bad = tmp_path / "misfit"
    bad.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(576, 2),
        },
        str(bad / "adapter_model.safetensors"),
    )
    with pytest.raises(InvalidAdapter) as refused:
        client.upload("sdk-misfit", bad)
    assert refused.value.status == 422 and "shape" in str(refused.value)

    monkeypatch.delenv("TASKSERVE_API_KEY", raising=False)
    with Client(live.url) as anonymous, pytest.raises(Unauthorized):
        list(anonymous.tasks())
    with Client(live.url, api_key="wrong") as wrong, pytest.raises(Unauthorized):
        wrong.generate("base", PROMPT)
    with Client(live.url, api_key=INFERENCE_KEY) as reader:
        assert reader.generate("base", PROMPT, max_new_tokens=2).usage.completion_tokens == 2
        with pytest.raises(Forbidden) as forbidden:
            reader.upload_template("sdk-forbidden", CAPITALS)
    assert forbidden.value.status == 403
    with Client(closed_url) as nowhere, pytest.raises(ServerUnreachable) as unreachable:
        nowhere.generate("base", PROMPT)
    assert closed_url in str(unreachable.value)


def test_local_checks_send_nothing(client: Client, tmp_path: Path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InvalidAdapter) as caught:
        client.upload("sdk-pickled", pickled)
    assert caught.value.status is None and "safe_serialization=True" in str(caught.value)
    with pytest.raises(UnknownTask):
        client.task("sdk-pickled")  # nothing reached the server


async def test_async_client(live, lora_dir: Path, lora_model):
    async with AsyncClient(live.url, api_key=ADMIN_KEY) as client:
        assert await client.health()
        assert (await client.ready()).ready
        whole = await client.generate("base", PROMPT, max_new_tokens=8)
        events = [event async for event in client.stream("base", PROMPT, max_new_tokens=8)]
        assert events[-1].is_final and "".join(e.text for e in events) == whole.text
        assert (await client.chat("base", [{"role": "user", "content": "Hi"}], max_new_tokens=2)).usage

        task = "sdk-async"
        assert (await client.upload(task, lora_dir)).version == 1
        assert (await client.upload(task, lora_model)).unchanged  # the same files as version 1
        assert (await client.upload(task, lora_model, description="described")).version == 2
        assert (await client.upload_template(task, CAPITALS)).kind == "template"
        assert task in [v.task_id async for v in client.tasks(page_size=2)]
        assert (await client.rollback(task, 2)).kind == "lora"
        info = await client.task(task)
        assert (info.version, len(info.versions)) == (2, 3)
        await client.delete(task)
        with pytest.raises(UnknownTask):
            await client.task(task)
        with pytest.raises(UnknownTask):
            async for _ in client.stream(task, PROMPT):
                pass
