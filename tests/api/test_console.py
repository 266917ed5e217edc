"""The console's routes over HTTP: the page and its assets (CSP, MIME types, caching, offline), the setting that turns
it off, and the JSON it adds (/v1/stats, the caller's scope, a version's config, residency and last use)."""

from __future__ import annotations

import glob
import re
import tomllib
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import ADMIN_KEY, INFERENCE_KEY, REPO, bearer, metric

from server.api.console import CONSOLE_DIR
from server.app import create_app
from server.config import Settings

SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name, never fetched
IMPORT = re.compile(r"""^\s*import\s[^'"]*['"](\.{1,2}/[^'"]+)['"]""", re.MULTILINE)


@pytest.fixture(scope="module")
def client():
    return TestClient(create_app(Settings(store="memory://")))  # no lifespan: the page and assets need no model


def test_root_redirects_to_the_console_relatively(client):
    for path in ("/", "/console"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 307 and response.headers["location"] == "console/", path  # keeps a proxy prefix


def test_the_page_has_a_strict_csp_and_no_inline_code(client):
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["require-trusted-types-for"] == "'script'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-cache" and page.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)  # every script is a file
    assert "style=" not in page.text and "<style" not in page.text


def test_every_asset_is_local_typed_and_cached_for_good(client):
    page = client.get("/console/").text
    urls = [u for u in re.findall(r"""(?:src|href)="([^"]+)\"""", page) if not u.startswith("#")]  # #: the pages
    assert urls and not [u for u in urls if re.match(r"^(https?:)?//", u)]
    seen, pending = set(), [f"/console/{u}" for u in urls]
    while pending:  # the ES module graph, from app.js through every relative import
        url = pending.pop()
        if url in seen:
            continue
        seen.add(url)
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable", url
        expected = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}[Path(url).suffix]
        assert response.headers["content-type"].startswith(expected), url
        assert client.get(url, headers={"if-none-match": response.headers["etag"]}).status_code == 304
        if url.endswith(".js"):
            external = set(re.findall(r"https?://[^'\"\s]+", response.text)) - {SVG_NAMESPACE}
            assert not external, url
            pending += [_normalise(f"{url.rsplit('/', 1)[0]}/{imported}") for imported in IMPORT.findall(response.text)]
    shipped = {p.relative_to(CONSOLE_DIR / "assets").as_posix() for p in (CONSOLE_DIR / "assets").rglob("*.*")}
    served = {re.sub(r"^/console/assets/[0-9a-f]+/", "", u) for u in seen}
    assert served == shipped  # nothing unreachable ships, nothing reachable is missing


def _normalise(url: str) -> str:
    parts: list[str] = []
    for part in url.split("/"):
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def test_an_asset_under_another_digest_is_404(client):
    assert client.get("/console/assets/0123456789abcdef/js/app.js").status_code == 404
    digest = re.search(r"assets/([0-9a-f]+)/", client.get("/console/").text).group(1)
    assert client.get(f"/console/assets/{digest}/js/no-such.js").status_code == 404


def test_the_package_ships_every_console_file():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["server"]
    packaged = {path for pattern in patterns for path in glob.glob(pattern, root_dir=REPO / "server")}
    on_disk = {p.relative_to(REPO / "server").as_posix() for p in CONSOLE_DIR.rglob("*") if p.is_file()}
    assert on_disk == packaged


def test_the_console_setting_turns_it_off():
    client = TestClient(create_app(Settings(store="memory://", console=False)))
    assert client.get("/", follow_redirects=False).status_code == 404
    assert client.get("/console/").status_code == 404
    assert client.get("/health").status_code == 200


def test_the_console_data_needs_a_key_and_says_its_scope(live):
    assert httpx.get(f"{live.url}/console/", timeout=30).status_code == 200  # the page itself is open
    assert httpx.get(f"{live.url}/console/api/session", timeout=30).status_code == 401
    for key, scope in ((INFERENCE_KEY, "inference"), (ADMIN_KEY, "admin")):
        session = httpx.get(f"{live.url}/console/api/session", headers=bearer(key), timeout=30).json()
        assert session["scope"] == scope and session["open"] is False and session["model"]


def test_an_open_service_says_so(open_client):
    session = open_client.get("/console/api/session").json()
    assert session["scope"] == "admin" and session["open"] is True


def test_stats_read_the_same_numbers_as_metrics(live, http):
    assert httpx.get(f"{live.url}/v1/stats", timeout=30).status_code == 401
    before = http.get("/v1/stats").json()
    done = http.post("/v1/tasks/base/generate", json={"prompt": "Hi", "max_new_tokens": 4, "ignore_eos": True})
    assert done.status_code == 200
    after = http.get("/v1/stats").json()
    samples = live.metrics()
    assert after["completion_tokens"] - before["completion_tokens"] == 4
    assert after["completion_tokens"] == metric(samples, "taskserve_completion_tokens_total")
    assert after["time_to_first_token"]["count"] == metric(samples, "taskserve_time_to_first_token_seconds_count")
    assert after["time_to_first_token"]["count"] == before["time_to_first_token"]["count"] + 1
    assert after["max_batch_size"] == 8 and after["instance"] == before["instance"]
    assert after["adapter_budget_bytes"]["device"] == metric(samples, "taskserve_adapter_budget_bytes", tier="device")
    bounds = [le for le, _ in after["inter_token_latency"]["buckets"]]
    assert bounds == sorted(bounds) and after["inter_token_latency"]["count"] >= 3


def test_a_versions_config_is_the_stored_file(http, capitals):
    config = http.get(f"/console/api/tasks/{capitals}/versions/1/config").json()
    assert config["file"] == "template.json"
    assert config["content"]["instruction"] == "Answer with the capital city only."
    missing = http.get(f"/console/api/tasks/{capitals}/versions/99/config")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "unknown_version"
    assert http.get("/console/api/tasks/no-such-task/versions/1/config").json()["error"]["type"] == "unknown_task"


def test_usage_says_resident_and_last_use_after_a_generation(http, capitals):
    key = f"{capitals}@1"
    assert http.post(f"/v1/tasks/{capitals}/generate", json={"prompt": "Spain", "max_new_tokens": 2}).status_code == 200
    used = http.get("/console/api/usage", params={"versions": f"{key},never-used@1"}).json()["usage"]
    assert used[key]["resident"] is True and used[key]["last_used"] > 0
    assert used["never-used@1"] == {"resident": False, "last_used": None}
    bad = http.get("/console/api/usage", params={"versions": "no-version"})
    assert bad.status_code == 400 and "task@version" in bad.json()["error"]["message"]
