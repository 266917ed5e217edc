"""API keys: scopes on the live server, open mode, constant-time comparison, and the settings that carry them."""

from __future__ import annotations

import hmac
import logging
import socket
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from live_server import ADMIN_KEY, INFERENCE_KEY, bearer

from server.api.auth import OPEN_WARNING
from server.app import create_app
from server.config import Settings

TEMPLATE = {"template": {"instruction": "Reply in French."}}
GENERATE = {"prompt": "Hello", "max_new_tokens": 2}


def test_inference_key_generates_but_may_not_upload(live):
    with httpx.Client(base_url=live.url, headers=bearer(INFERENCE_KEY), timeout=60) as client:
        assert client.post("/v1/tasks/base/generate", json=GENERATE).status_code == 200
        assert client.get("/v1/tasks").status_code == 200
        refused = client.post("/v1/tasks/by-inference/versions", json=TEMPLATE)
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
        assert client.get("/v1/tasks/by-inference").status_code == 404  # nothing was stored
        assert client.delete("/v1/tasks/by-inference").status_code == 403
        assert client.post("/v1/tasks/by-inference/rollback", json={"version": 1}).status_code == 403


def test_admin_key_uploads_and_does_everything_inference_does(live):
    with httpx.Client(base_url=live.url, headers=bearer(ADMIN_KEY), timeout=60) as client:
        created = client.post("/v1/tasks/by-admin/versions", json=TEMPLATE)
        assert created.status_code == 201, created.text
        assert client.post("/v1/tasks/by-admin/generate", json=GENERATE).json()["version"] == 1
        assert client.delete("/v1/tasks/by-admin").status_code == 204


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong-key"), {"Authorization": f"Basic {INFERENCE_KEY}"}, {"X-API-Key": "wrong-key"}],
    ids=["missing", "wrong", "not-bearer", "wrong-header"],
)
def test_missing_or_unknown_key_is_401(live, headers):
    for method, path, body in [
        ("POST", "/v1/tasks/base/generate", GENERATE),
        ("POST", "/v1/tasks/anything/versions", TEMPLATE),
        ("GET", "/v1/tasks", None),
    ]:
        response = httpx.request(method, f"{live.url}{path}", json=body, headers=headers, timeout=60)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "unauthorized"
    models = httpx.get(f"{live.url}/v1/models", headers=headers, timeout=60)
    assert models.status_code == 401 and models.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape


def test_x_api_key_header_works_too(live):
    response = httpx.post(
        f"{live.url}/v1/tasks/base/generate", json=GENERATE, headers={"X-API-Key": INFERENCE_KEY}, timeout=60
    )
    assert response.status_code == 200


def test_the_openai_client_sees_authentication_errors(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_probes_and_docs_need_no_key_and_metrics_do(live):
    for path in ("/health", "/ready", "/docs", "/openapi.json"):
        assert httpx.get(f"{live.url}{path}", timeout=60).status_code == 200, path
    assert httpx.get(f"{live.url}/metrics", timeout=60).status_code == 401
    metrics = httpx.get(f"{live.url}/metrics", headers=bearer(INFERENCE_KEY), timeout=60)
    assert metrics.status_code == 200 and "taskserve_running_rows" in metrics.text


def test_a_client_guessing_keys_is_refused_for_a_while_even_with_a_right_key(backbone, monkeypatch):
    settings = Settings(store="memory://", api_keys=["right"], bad_key_attempts=3)
    with TestClient(create_app(settings, backbone=backbone)) as client:
        assert client.get("/v1/tasks").status_code == 401  # no key at all is not a guess
        for guess in ("a", "b", "c"):
            assert client.get("/v1/tasks", headers=bearer(guess)).status_code == 401
        refused = client.get("/v1/tasks", headers=bearer("right"))
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["message"].startswith("too many invalid API keys from this client")
        now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: now + 60)  # a minute later, the attempts have refilled
        assert client.get("/v1/tasks", headers=bearer("right")).status_code == 200


def test_open_mode_says_so_and_lets_anyone_in(backbone, caplog):
    caplog.set_level(logging.WARNING, logger="taskserve")
    with TestClient(create_app(Settings(store="memory://"), backbone=backbone)) as client:
        assert any(r.levelno == logging.WARNING and r.getMessage() == OPEN_WARNING for r in caplog.records)
        assert client.post("/v1/tasks/open-task/versions", json=TEMPLATE).status_code == 201
        assert client.get("/v1/models").status_code == 200


def test_keys_are_compared_in_constant_time_against_every_key(backbone, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    settings = Settings(store="memory://", api_keys=["inf-1", "inf-2"], admin_keys=["adm-1"])
    with TestClient(create_app(settings, backbone=backbone)) as client:
        assert client.get("/v1/tasks", headers=bearer("inf-1")).status_code == 200
        assert len(calls) == 3  # the first key matched, and the others were still compared
        calls.clear()
        assert client.get("/v1/tasks", headers=bearer("nope")).status_code == 401
        assert len(calls) == 3
        calls.clear()
        assert client.post("/v1/tasks/t/versions", json=TEMPLATE, headers=bearer("adm-1")).status_code == 201
        assert len(calls) == 3  # once per request, although the route checks the key before reading the body


def test_keys_come_from_env_as_comma_separated_lists_and_from_flags(monkeypatch):
    monkeypatch.setenv("TASKSERVE_API_KEYS", " key-one, key-two ,,")
    monkeypatch.setenv("TASKSERVE_ADMIN_KEYS", "key-three")
    settings = Settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["key-one", "key-two"]
    assert [k.get_secret_value() for k in settings.admin_keys] == ["key-three"]
    assert "key-" not in repr(settings)  # secrets stay out of logs
    flags = Settings(_cli_parse_args=["--admin-keys", "x,y"])
    assert [k.get_secret_value() for k in flags.admin_keys] == ["x", "y"]


def test_every_new_setting_is_a_documented_flag(capsys):
    with pytest.raises(SystemExit):
        Settings(_cli_parse_args=["--help"])
    usage = capsys.readouterr().out
    assert "--api-keys" in usage and "--admin-keys" in usage and "open to anyone" in usage


def test_an_anonymous_upload_is_refused_before_its_body_is_read(live):
    """Headers announce 50 MB and only a few bytes follow: the 401 must come without waiting for the rest."""
    head = (
        "POST /v1/tasks/big/versions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{live.port}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
        "Content-Length: 50000000\r\n\r\n--x\r\n"
    )
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(head.encode())
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"401"
