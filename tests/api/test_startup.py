"""Start-up, readiness and admission: the server answers at once, probes answer from memory, overload is refused."""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import free_port

from server.api.admission import Load, estimated_wait
from server.app import create_app
from server.config import Settings
from server.engine.backbone import Backbone


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_app_answers_while_the_model_loads(backbone, monkeypatch):
    release = threading.Event()

    def slow_load(*args, **kwargs) -> Backbone:
        release.wait(30)
        return backbone

    monkeypatch.setattr(Backbone, "load", slow_load)
    with TestClient(create_app(Settings(store="memory://"))) as client:
        assert client.get("/health").json() == {"status": "ok"}
        loading = client.get("/ready")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert "loading the model smollm2-135m-instruct" in loading.json()["detail"]
        early = client.post("/v1/tasks/base/generate", json={"prompt": "hi"})
        assert early.status_code == 503 and early.json()["error"]["type"] == "unavailable"
        assert early.headers["retry-after"] == "1"
        release.set()
        wait_until(lambda: client.get("/ready").status_code == 200)
        assert client.post("/v1/tasks/base/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_task_reads_answer_while_the_model_loads_and_uploads_wait_for_it(backbone, monkeypatch, tmp_path):
    url = f"file://{tmp_path / 'store'}"
    with TestClient(create_app(Settings(store=url), backbone=backbone)) as client:
        template = {"template": {"instruction": "Answer briefly."}}
        assert client.post("/v1/tasks/kept/versions", json=template).status_code == 201
    release = threading.Event()
    monkeypatch.setattr(Backbone, "load", lambda *args, **kwargs: release.wait(30) and backbone)
    with TestClient(create_app(Settings(store=url))) as client:  # a restart: the model loads again
        wait_until(lambda: client.get("/v1/tasks").status_code == 200)
        assert client.get("/ready").status_code == 503
        assert [t["task_id"] for t in client.get("/v1/tasks").json()["tasks"]] == ["kept"]
        info = client.get("/v1/tasks/kept").json()
        assert info["version"] == 1 and info["resident"] is False
        early = client.post("/v1/tasks/other/versions", json=template)
        assert early.status_code == 503 and "still loading" in early.json()["error"]["message"]
        release.set()
        wait_until(lambda: client.get("/ready").status_code == 200)
        assert client.post("/v1/tasks/other/versions", json=template).status_code == 201


@pytest.mark.parametrize("keys", [[], ["k"]], ids=["open", "keyed"])
def test_a_failed_start_says_so_on_both_probes(monkeypatch, keys):
    """Probes send no key: on a keyed server the failure's text (a path, an address) stays in the log."""

    def broken(*args, **kwargs):
        raise OSError("no such model directory /srv/models/x")

    failures = []
    monkeypatch.setattr(Backbone, "load", broken)
    settings = Settings(store="memory://", api_keys=keys)
    with TestClient(create_app(settings, on_failure=lambda: failures.append(1))) as client:
        wait_until(lambda: client.get("/health").status_code == 503)
        for probe in ("/health", "/ready"):
            body = client.get(probe).json()
            assert body["status"] == "failed"
            if keys:
                assert body["detail"] == "details in the server's log" and "/srv" not in str(body)
            else:
                assert "no such model directory /srv/models/x" in body["detail"]
    assert failures == [1]


def test_ready_answers_from_memory_when_the_store_hangs(backbone, monkeypatch):
    """/ready never waits on the store: a hung ping shows as a stale answer, not as a slow probe."""
    hung, pings = threading.Event(), []

    def ping(self) -> None:
        pings.append(time.monotonic())
        if len(pings) > 1:  # the first answers; every later one hangs
            hung.wait(10)

    monkeypatch.setattr("adapters_store.memory.MemoryStore.ping", ping)
    monkeypatch.setattr("server.api.health.PING_EVERY_S", 0.05)
    monkeypatch.setattr("server.api.health.STALE_AFTER_S", 0.5)
    with TestClient(create_app(Settings(store="memory://"), backbone=backbone)) as client:
        wait_until(lambda: len(pings) > 1)
        answers = []
        for _ in range(10):
            started = time.perf_counter()
            answers.append(client.get("/ready").json()["status"])
            assert client.get("/health").status_code == 200
            assert time.perf_counter() - started < 0.1
            time.sleep(0.1)
        hung.set()
    assert answers[0] == "ready" and answers[-1] == "store unavailable"


def test_the_store_password_never_reaches_the_log_or_the_probes(backbone, caplog):
    url = f"redis://:S3cretPW@127.0.0.1:{free_port()}/0"  # nothing listens there
    with caplog.at_level(logging.INFO), TestClient(create_app(Settings(store=url), backbone=backbone)) as client:
        ready = client.get("/ready")
    assert ready.status_code == 503 and "S3cretPW" not in ready.text
    assert "redis://***@127.0.0.1" in caplog.text and "S3cretPW" not in caplog.text


@pytest.mark.parametrize(
    ("load", "wait"),
    [
        (Load(in_system=0, max_rows=8, step_seconds=None, tokens_per_row=100), 0.0),  # cold, a free row
        (Load(in_system=8, max_rows=8, step_seconds=None, tokens_per_row=100), math.inf),  # cold and full
        (Load(in_system=7, max_rows=8, step_seconds=0.1, tokens_per_row=100), 0.0),  # the last free row
        (Load(in_system=8, max_rows=8, step_seconds=0.1, tokens_per_row=100), 1.25),  # the next to finish
        (Load(in_system=23, max_rows=8, step_seconds=0.1, tokens_per_row=100), 20.0),  # two batches ahead
    ],
)
def test_estimated_wait(load, wait):
    assert estimated_wait(load) == pytest.approx(wait)


def test_every_request_gives_its_place_back(open_client):
    """Answered, refused after admission (400, 404), streamed, or left early: the count of requests in the system
    returns to zero, so the estimate never counts requests that are gone."""
    admission = open_client.app.state.admission
    assert open_client.post("/v1/tasks/base/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    assert open_client.post("/v1/tasks/base/generate", json={"prompt": "x " * 9000}).status_code == 400
    assert open_client.post("/v1/tasks/missing/generate", json={"prompt": "hi"}).status_code == 404
    body = {"model": "base", "prompt": "hi", "max_tokens": 3, "stream": True}
    with open_client.stream("POST", "/v1/completions", json=body) as stream:
        next(stream.iter_lines())  # leaves after the first event
    wait_until(lambda: admission.in_system == 0, timeout=10)


def test_a_request_that_would_wait_too_long_is_429_at_once(backbone):
    """One row, busy for seconds: the next request is refused with Retry-After instead of queueing."""
    settings = Settings(store="memory://", max_batch_size=1, max_queue_wait=0.05)
    long = {"prompt": "Once upon a time", "max_new_tokens": 40, "ignore_eos": True, "stream": True}
    with TestClient(create_app(settings, backbone=backbone)) as client:
        with client.stream("POST", "/v1/tasks/base/generate", json=long) as running:
            events = running.iter_lines()
            for _ in range(6):  # a few tokens: the step time is measured
                next(events)
            started = time.perf_counter()
            refused = client.post("/v1/tasks/base/generate", json={"prompt": "hi", "max_new_tokens": 50})
            assert time.perf_counter() - started < 1.0
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "queue_full" and "overloaded" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        wait_until(lambda: not client.app.state.engine.running)  # the reader left: its row is cancelled
        assert client.post("/v1/completions", json={"model": "base", "prompt": "hi"}).status_code == 200


def test_server_help_names_env_variables_defaults_and_units(capsys):
    with pytest.raises(SystemExit):
        Settings(_cli_parse_args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in Settings.model_fields:
        assert f"TASKSERVE_{name.upper()}" in text, name
    for shown in ("--max-upload-bytes SIZE", "(default: 256MiB)", "--body-idle-timeout SECONDS", "--api-keys KEYS"):
        assert shown in text, shown
    assert "default factory" not in text and "SecretStr" not in text and "268435456" not in text


def test_the_probe_port_answers_while_the_event_loop_is_busy(backbone):
    port = free_port()
    app = create_app(Settings(store="memory://", probe_port=port), backbone=backbone)

    @app.get("/busy")
    async def busy() -> dict:  # holds the event loop, as a backlog of requests would
        time.sleep(1.5)
        return {}

    probes = f"http://127.0.0.1:{port}"
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        assert httpx.get(f"{probes}/ready").json() == {"status": "ready", "model": backbone.name}
        blocked = pool.submit(client.get, "/busy")
        time.sleep(0.3)
        started = time.perf_counter()
        assert httpx.get(f"{probes}/health", timeout=5).json() == {"status": "ok"}
        assert time.perf_counter() - started < 0.5 and not blocked.done()
        assert blocked.result().status_code == 200
        missing = httpx.get(f"{probes}/metrics")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
