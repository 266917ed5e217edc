"""Fixtures of the API tests: one live server for the whole run, and in-process apps on one loaded backbone."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from live_server import ADMIN_KEY, INFERENCE_KEY, LiveServer, bearer

from server.app import create_app
from server.config import Settings
from server.engine.backbone import DEFAULT_MODEL, Backbone


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`python -m server` under uvicorn, with one inference key and one admin key; started once per run."""
    server = LiveServer(
        tmp_path_factory.mktemp("live") / "server.log",
        "--max-batch-size",
        "8",
        env={
            "TASKSERVE_API_KEYS": f"{INFERENCE_KEY},other-inference-key",
            "TASKSERVE_ADMIN_KEYS": ADMIN_KEY,
            "TASKSERVE_BAD_KEY_ATTEMPTS": "1000",  # its tests send wrong keys on purpose; the throttle has its own
        },
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    """A plain HTTP client on the live server, with the inference key."""
    with httpx.Client(base_url=live.url, headers=bearer(INFERENCE_KEY), timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    """The official `openai` client on the live server, with the inference key."""
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=INFERENCE_KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def admin_http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, headers=bearer(ADMIN_KEY), timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return Backbone.load(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def open_client(backbone: Backbone) -> Iterator[TestClient]:
    """An in-process app with no keys configured: open."""
    with TestClient(create_app(Settings(store="memory://"), backbone=backbone)) as client:
        yield client


@pytest.fixture(scope="session")
def capitals(admin_http: httpx.Client) -> str:
    """A template task on the live server (few-shot: country -> capital); its id."""
    template = {
        "instruction": "Answer with the capital city only.",
        "examples": [{"input": "Germany", "output": "Berlin"}, {"input": "Italy", "output": "Rome"}],
        "input_prefix": "Country: ",
        "input_suffix": "\nCapital:",
    }
    created = admin_http.post("/v1/tasks/capitals/versions", json={"template": template})
    assert created.status_code == 201, created.text
    return "capitals"
