"""Fixtures of the client tests: one real `python -m server` on loopback, adapters that fit its backbone, and a
helper that runs the CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from client_helpers import ADMIN_KEY, INFERENCE_KEY

from clients import Client

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server the client tests talk to (default model, tasks in memory, one admin and one inference key).

    Started once for every client test: starting it costs seconds, and each test uses task names of its own."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("clients-server") / "server.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TASKSERVE_API_KEYS": INFERENCE_KEY,
        "TASKSERVE_ADMIN_KEYS": ADMIN_KEY,
    }
    flags = ["--port", str(port), "--store", "memory://", "--device", "cpu", "--max-batch-size", "8"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "server", *flags], cwd=REPO, env=env, stdout=log, stderr=log)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        _wait_ready(server, timeout=240)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout} s:\n{server.log()}")


@pytest.fixture
def client(live: Server) -> Iterator[Client]:
    with Client(live.url, api_key=ADMIN_KEY, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def closed_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


# --- adapters for the server's backbone ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from clients.train import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def lora_model(default_model_dir: Path):
    """A PeftModel (LoRA on q/v) over the server's backbone, with B randomised so that it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    with warnings.catch_warnings():  # transformers' deprecation notice about a call PEFT makes
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def lora_dir(lora_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA saved as `save_pretrained` writes it (plus a README.md, which uploads leave out)."""
    out = tmp_path_factory.mktemp("lora")
    lora_model.save_pretrained(out, safe_serialization=True)
    return out


# --- the CLI -----------------------------------------------------------------------------------------------------


@pytest.fixture
def cli(live: Server):
    """Run `python -m clients.cli ARGS` against the live server (admin key from the environment)."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120):
        full_env = {
            **os.environ,
            "TASKSERVE_URL": live.url,
            "TASKSERVE_API_KEY": ADMIN_KEY,
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        return subprocess.run(
            [sys.executable, "-m", "clients.cli", *args],
            cwd=REPO,
            env=full_env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
