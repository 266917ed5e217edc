"""The `taskserve` CLI in a subprocess against a real server: every command, and every command's failure as one
`error:` line with a non-zero status (2 for a bad command line, 1 otherwise)."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from client_helpers import ADMIN_KEY, INFERENCE_KEY, assert_error

REPO = Path(__file__).resolve().parents[2]

CAPITALS = {
    "template": {
        "instruction": "Answer with the capital city only.",
        "examples": [{"input": "Germany", "output": "Berlin"}, {"input": "Italy", "output": "Rome"}],
        "input_prefix": "Country: ",
        "input_suffix": "\nCapital:",
    },
    "description": "capitals",
}


def test_keys_create_list_revoke(cli, tmp_path: Path):
    created = cli("keys", "create", "team-cli", "--admin", "--requests-per-s", "5", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["tenant"] == "team-cli" and key["scope"] == "admin" and key["key"]
    listed = json.loads(cli("keys", "list", "--tenant", "team-cli", "--json").stdout)
    assert [(k["id"], k["requests_per_s"]) for k in listed] == [(key["id"], 5.0)] and "key" not in listed[0]
    table = cli("keys", "list")
    assert table.returncode == 0 and key["id"] in table.stdout and key["key"] not in table.stdout

    template = tmp_path / "t.json"
    template.write_text(json.dumps(CAPITALS))
    as_tenant = {"TASKSERVE_API_KEY": key["key"]}
    assert cli("upload", "team-cli/capitals", str(template), env=as_tenant).returncode == 0
    assert_error(cli("upload", "elsewhere", str(template), env=as_tenant), 1, "unknown task 'elsewhere'")
    assert_error(cli("keys", "list", env=as_tenant), 1, "bootstrap admin key")

    revoked = cli("keys", "revoke", key["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert_error(cli("keys", "revoke", key["id"]), 1, "no key")
    assert cli("rm", "team-cli/capitals", "--yes").returncode == 0


def test_upload_tasks_generate_rollback_rm(cli, lora_dir: Path, tmp_path: Path):
    uploaded = cli("upload", "cli-lora", str(lora_dir), "--description", "first")
    assert uploaded.returncode == 0, uploaded.stderr
    assert "cli-lora" in uploaded.stdout and "version 1" in uploaded.stdout and "lora" in uploaded.stdout

    template = tmp_path / "capitals.json"
    template.write_text(json.dumps(CAPITALS))
    second = cli("upload", "cli-lora", str(template), "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["version"] == 2 and json.loads(second.stdout)["kind"] == "template"

    listing = cli("tasks")
    assert listing.returncode == 0 and "cli-lora" in listing.stdout and "template" in listing.stdout
    listed = json.loads(cli("tasks", "--json").stdout)
    assert any(t["task_id"] == "cli-lora" and t["version"] == 2 for t in listed)
    shown = cli("tasks", "cli-lora")
    assert shown.returncode == 0 and "version 2" in shown.stdout and "first" in shown.stdout

    generated = cli("generate", "cli-lora", "France", "--max-new-tokens", "4")
    assert generated.returncode == 0 and "Paris" in generated.stdout

    back = cli("rollback", "cli-lora", "1", "--json")
    assert back.returncode == 0 and json.loads(back.stdout)["kind"] == "lora"
    assert json.loads(cli("--json", "tasks", "cli-lora").stdout)["version"] == 1

    assert_error(cli("rm", "cli-lora"), 2, "--yes")  # nobody to ask: stdin is not a terminal
    assert cli("tasks", "cli-lora").returncode == 0
    removed = cli("rm", "cli-lora", "--yes")
    assert removed.returncode == 0 and "deleted" in removed.stdout
    assert_error(cli("tasks", "cli-lora"), 1, "unknown task 'cli-lora'")


def test_rm_asks_on_a_terminal(cli, live, lora_dir: Path):
    assert cli("upload", "cli-asked", str(lora_dir)).returncode == 0
    for answer, status in (("n", 1), ("y", 0)):
        controller, terminal = pty.openpty()
        os.write(controller, f"{answer}\n".encode())
        asked = subprocess.run(
            [sys.executable, "-m", "clients.cli", "rm", "cli-asked"],
            cwd=REPO,
            env={**os.environ, "TASKSERVE_URL": live.url, "TASKSERVE_API_KEY": ADMIN_KEY},
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=60,
        )
        os.close(controller)
        os.close(terminal)
        assert asked.returncode == status, asked.stderr
        assert "delete task 'cli-asked' and all its 1 version(s)?" in asked.stderr
    assert_error(cli("tasks", "cli-asked"), 1, "unknown task")


def test_generate_modes(cli):
    plain = cli("generate", "base", "The capital of France is", "--max-new-tokens", "6")
    assert plain.returncode == 0 and plain.stdout.strip()
    streamed = cli("generate", "base", "The capital of France is", "--max-new-tokens", "6", "--stream")
    assert streamed.returncode == 0 and streamed.stdout.strip() == plain.stdout.strip()
    as_json = json.loads(cli("generate", "base", "The capital of France is", "--max-new-tokens", "6", "--json").stdout)
    assert as_json["usage"]["completion_tokens"] == len(as_json["token_ids"])
    events = cli("generate", "base", "Hi", "--max-new-tokens", "3", "--stream", "--json").stdout.splitlines()
    assert json.loads(events[-1])["finish_reason"] == "length"
    chat = cli("generate", "base", "What is the capital of France?", "--chat", "--max-new-tokens", "12")
    assert "Paris" in chat.stdout
    from_stdin = cli("generate", "base", "-", "--max-new-tokens", "2", input="Once upon a time")
    assert from_stdin.returncode == 0 and from_stdin.stdout.strip()


def test_chat_keeps_history_and_quits_on_eof(cli):
    session = cli("chat", "base", "--max-new-tokens", "16", input="What is the capital of France?\nAnd of Italy?\n")
    assert session.returncode == 0, session.stderr
    assert "Paris" in session.stdout and "Rome" in session.stdout  # the second turn needed the first
    assert_error(cli("chat", "cli-no-such-task", input="hi\n"), 1, "unknown task")


def test_status_and_serve_help(cli, closed_url: str):
    status = cli("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True
    assert_error(cli("status", "--url", closed_url), 1, "cannot reach")
    served = cli("serve", "--help", timeout=120)
    assert served.returncode == 0 and "--port" in served.stdout and "--store" in served.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("tasks",),
        ("tasks", "x"),
        ("generate", "base", "hi"),
        ("chat", "base"),
        ("upload", "x", "{lora_dir}"),
        ("rm", "x"),
        ("rollback", "x", "1"),
    ],
)
def test_unreachable_server(cli, closed_url: str, lora_dir: Path, args):
    args = tuple(a.format(lora_dir=lora_dir) for a in args)
    assert_error(cli("--url", closed_url, *args, input=""), 1, f"cannot reach the server at {closed_url}")


def test_server_side_errors(cli):
    assert_error(cli("generate", "cli-missing", "hi"), 1, "unknown task 'cli-missing'")
    assert_error(cli("generate", "cli-missing", "hi", "--stream"), 1, "unknown task")
    assert_error(cli("rm", "cli-missing"), 1, "unknown task")
    assert_error(cli("rollback", "cli-missing", "1"), 1, "unknown task")
    assert_error(cli("generate", "base", "hi", "--max-new-tokens", "0"), 1, "max_new_tokens")
    assert_error(cli("tasks", env={"TASKSERVE_API_KEY": "nope"}), 1, "invalid API key")
    assert_error(cli("upload", "base", "x"), 1, "reserved")
    forbidden = cli("rm", "cli-anything", "--yes", env={"TASKSERVE_API_KEY": INFERENCE_KEY})
    assert_error(forbidden, 1, "admin key")


def test_bad_files(cli, lora_dir: Path, tmp_path: Path):
    assert_error(cli("upload", "cli-bad", str(tmp_path / "missing")), 1, "no such file or directory")
    pickled = tmp_path / "pickled"
    shutil.copytree(lora_dir, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert_error(cli("upload", "cli-bad", str(pickled)), 1, "safe_serialization=True")
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip")
    assert_error(cli("upload", "cli-bad", str(garbage)), 1, "cannot be read")
    assert_error(cli("tasks", "cli-bad"), 1, "unknown task")  # nothing was uploaded


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "required"),
        (("frobnicate",), "invalid choice"),
        (("upload", "x"), "required: path"),
        (("rollback", "x", "one"), "invalid int value"),
        (("generate", "base", "hi", "--temperature", "hot"), "invalid float value"),
        (("train", "--method", "prefix", "--data", "d.jsonl"), "--task"),
        (("train", "--method", "adapters", "--data", "d.jsonl", "--task", "t"), "invalid choice"),
        (("train", "--method", "lora", "--data", "d.jsonl", "--task", "t", "--steps", "0"), "--steps"),
        (("train", "--method", "lora", "--data", "d.jsonl", "--task", "base"), "reserved"),
    ],
)
def test_bad_arguments(cli, args, fragment):
    assert_error(cli(*args), 2, fragment)


def test_help_names_defaults_units_and_env_variables(cli):
    train = " ".join(cli("train", "--help").stdout.split())
    for text in (
        "--batch-size N examples per optimizer step (default: 8)",
        "--lora-alpha",
        "--lora-dropout",
        "--lora-targets",
        "(default: q_proj,v_proj)",
        "--seed SEED seeds initialisation",
        "TASKSERVE_URL",
        "--max-length TOKENS",
        "--timeout SECONDS",
    ):
        assert text in train, text
    generate = " ".join(cli("generate", "--help").stdout.split())
    for flag in ("--top-p", "--top-k", "--seed", "--temperature"):
        assert f"{flag} {flag[2:].upper().replace('-', '_')} " in generate and "(default:" in generate
