"""/docs and /redoc work offline: every script, style and icon they reference is served by the app itself."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(Settings(store="memory://")))  # no lifespan: the docs need no model


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_only_local_assets_and_serve_them(client, page):
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html.text)
    urls += re.findall(r"""url:\s*["']([^"']+)["']""", html.text)  # swagger's openapi url
    assert urls
    assert not [u for u in urls if re.match(r"^(https?:)?//", u)], urls
    assert "cdn" not in html.text.lower()
    if page == "/docs":
        assert '"validatorUrl": null' in html.text  # no spec sent to swagger.io's online validator
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.content, url


def test_the_spec_documents_every_route_and_both_key_schemes(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/tasks/{task_id}/generate", "/metrics"):
        assert path in spec["paths"], path
    assert set(spec["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}


def test_the_spec_documents_validation_errors_as_they_are_answered(client):
    """Validation errors are 400s in the documented shape: no route claims FastAPI's 422 HTTPValidationError."""
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(spec)
    generate = spec["paths"]["/v1/tasks/{task_id}/generate"]["post"]["responses"]
    assert "422" not in generate and generate["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorBody"
    )
    upload = spec["paths"]["/v1/tasks/{task_id}/versions"]["post"]["responses"]
    assert upload["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")  # invalid_adapter
