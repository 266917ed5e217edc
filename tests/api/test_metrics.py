"""GET /metrics moves with the traffic, and a client that leaves frees its row (real uvicorn, real sockets)."""

from __future__ import annotations

import time

import httpx
import pytest
from live_server import INFERENCE_KEY, bearer, metric, parse_metrics

from adapters_store import StoreUnavailable

GENERATE_ROUTE = "/v1/tasks/{task_id}/generate"
LONG = {"prompt": "Once upon a time", "max_new_tokens": 2000, "ignore_eos": True}


def wait_for_no_running_rows(live, timeout: float = 5.0) -> float:
    """Seconds until taskserve_running_rows reads 0; fails past `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if metric(live.metrics(), "taskserve_running_rows") == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"rows still running {timeout} s after the client left")


def test_metrics_move_after_a_request(live, http):
    before = live.metrics()
    body = http.post("/v1/tasks/base/generate", json={"prompt": "Hello", "max_new_tokens": 5, "ignore_eos": True})
    assert body.status_code == 200
    usage = body.json()["usage"]
    after = live.metrics()

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("taskserve_http_requests_total", route=GENERATE_ROUTE, method="POST", status="200") == 1
    assert moved("taskserve_prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("taskserve_completion_tokens_total") == 5
    assert moved("taskserve_time_to_first_token_seconds_count") == 1
    assert moved("taskserve_inter_token_latency_seconds_count") == 4
    assert moved("taskserve_generations_total", finish_reason="length") == 1
    assert moved("taskserve_engine_steps_total") >= 5
    for gauge in ("taskserve_running_rows", "taskserve_queued_requests", "taskserve_resident_tasks"):
        assert (gauge, ()) in after
    assert metric(after, "taskserve_max_batch_size") == 8  # the live server's flag
    assert ("taskserve_adapter_bytes", (("tier", "host"),)) in after


def test_requests_are_counted_by_route_template_not_by_task(live, http):
    before = live.metrics()
    for task in ("missing-a", "missing-b"):
        assert http.post(f"/v1/tasks/{task}/generate", json={"prompt": "x"}).status_code == 404
    after = live.metrics()
    labels = {"route": GENERATE_ROUTE, "method": "POST", "status": "404"}
    assert (
        metric(after, "taskserve_http_requests_total", **labels)
        - metric(before, "taskserve_http_requests_total", **labels)
        == 2
    )
    assert not any("missing-a" in str(key) for key in after)


def test_a_client_that_disconnects_mid_stream_frees_its_row(live):
    before = live.metrics()
    with httpx.Client(base_url=live.url, headers=bearer(INFERENCE_KEY), timeout=60) as client:
        with client.stream("POST", "/v1/tasks/base/generate", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # held: dropping a half-read iterator closes the connection already
            events = 0
            for line in lines:
                events += line.startswith("data: ")
                if events == 2:
                    break
            assert metric(live.metrics(), "taskserve_running_rows") == 1  # the row runs while the client reads
    # the connection is closed: the row must go long before its 2000 tokens
    wait_for_no_running_rows(live)
    after = live.metrics()
    cancelled = metric(after, "taskserve_generations_total", finish_reason="cancelled")
    assert cancelled - metric(before, "taskserve_generations_total", finish_reason="cancelled") == 1
    assert (
        metric(after, "taskserve_completion_tokens_total") - metric(before, "taskserve_completion_tokens_total") < 500
    )


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_row_too(live):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/tasks/base/generate", json=LONG, headers=bearer(INFERENCE_KEY), timeout=2.0)
    wait_for_no_running_rows(live)
    deadline = time.monotonic() + 5
    labels = {"route": GENERATE_ROUTE, "method": "POST", "status": "499"}
    while metric(live.metrics(), "taskserve_http_requests_total", **labels) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(live.metrics(), "taskserve_http_requests_total", **labels) == 1


def test_openai_stream_disconnect_frees_its_row(live):
    body = {"model": "base", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=live.url, headers=bearer(INFERENCE_KEY), timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
    wait_for_no_running_rows(live)


def test_store_errors_are_counted(open_client, monkeypatch):
    def unavailable(**_):
        raise StoreUnavailable("the store is down")

    monkeypatch.setattr(open_client.app.state.engine.residency.store, "list", unavailable)
    before = parse_metrics(open_client.get("/metrics").text)
    response = open_client.get("/v1/tasks")
    assert response.status_code == 503 and response.json()["error"]["type"] == "store_unavailable"
    after = parse_metrics(open_client.get("/metrics").text)
    assert metric(after, "taskserve_store_errors_total") - metric(before, "taskserve_store_errors_total") == 1


def test_each_app_has_its_own_registry(open_client, backbone):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    other = TestClient(create_app(Settings(store="memory://"), backbone=backbone))  # no lifespan: nothing to load
    assert other.app.state.metrics.registry is not open_client.app.state.metrics.registry
    assert other.get("/metrics").status_code == 200


def test_per_tenant_and_opted_in_per_task_series_after_requests(backbone):
    """Per tenant always; per task for the first `task_metrics` tasks, the rest as `_other`; quota refusals too."""
    from fastapi.testclient import TestClient
    from live_server import ADMIN_KEY

    from server.app import create_app
    from server.config import Settings

    root = bearer(ADMIN_KEY)
    settings = Settings(store="memory://", admin_keys=[ADMIN_KEY], task_metrics=2)
    with TestClient(create_app(settings, backbone=backbone)) as client:
        template = {"template": {"instruction": "Answer in one word."}}
        tasks = ("team-a/one", "team-a/two", "team-a/three")
        for task_id in tasks:
            assert client.post(f"/v1/tasks/{task_id}/versions", json=template, headers=root).status_code == 201
        created = client.post("/v1/admin/keys", json={"tenant": "team-a"}, headers=root)
        team_a = bearer(created.json()["key"])
        created = client.post("/v1/admin/keys", json={"tenant": "team-a", "requests_per_s": 0.01}, headers=root)
        slow = bearer(created.json()["key"])  # one request, then one per 100 s
        before = parse_metrics(client.get("/metrics", headers=root).text)
        usages = []
        for task_id, key in [*((t, team_a) for t in tasks), ("base", root)]:
            answer = client.post(
                f"/v1/tasks/{task_id}/generate", json={"prompt": "Sky?", "max_new_tokens": 3}, headers=key
            )
            assert answer.status_code == 200, answer.text
            usages.append(answer.json()["usage"])
        for status in (200, 429):
            answer = client.post(
                "/v1/tasks/team-a/one/generate", json={"prompt": "Sky?", "max_new_tokens": 1}, headers=slow
            )
            assert answer.status_code == status, answer.text
            usages.append(answer.json().get("usage"))
        after = parse_metrics(client.get("/metrics", headers=root).text)
        tenant_scrape = client.get("/metrics", headers=team_a)  # the series name other tenants and their tasks
        assert tenant_scrape.status_code == 403 and "TASKSERVE_API_KEYS" in tenant_scrape.json()["error"]["message"]

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    team = {"tenant": "team-a"}
    usages = usages[:3] + usages[4:5]  # team-a's answers
    assert moved("taskserve_tenant_requests_total", **team) == 4
    assert moved("taskserve_tenant_requests_total", tenant="_global") == 1  # the bootstrap key
    assert moved("taskserve_tenant_rate_limited_total", **team) == 1
    assert moved("taskserve_tenant_prompt_tokens_total", **team) == sum(u["prompt_tokens"] for u in usages)
    assert moved("taskserve_tenant_completion_tokens_total", **team) == sum(u["completion_tokens"] for u in usages)
    assert moved("taskserve_tenant_time_to_first_token_seconds_count", **team) == 4
    assert moved("taskserve_tenant_queue_seconds_count", **team) == 4
    assert moved("taskserve_queue_seconds_count") == 5
    for task_id in tasks[:2]:  # the first two tasks seen have their own series
        assert moved("taskserve_task_requests_total", task=task_id) == 1 + (task_id == "team-a/one")
        assert moved("taskserve_task_time_to_first_token_seconds_count", task=task_id) == 1 + (task_id == "team-a/one")
    assert moved("taskserve_task_completion_tokens_total", task="team-a/two") == usages[1]["completion_tokens"]
    assert moved("taskserve_task_requests_total", task="_other") == 2  # team-a/three and base
    assert not any(labels == (("task", "team-a/three"),) for _, labels in after)


def test_no_task_ids_in_the_metrics_unless_opted_in(open_client):
    assert open_client.post("/v1/tasks/base/generate", json={"prompt": "Hi", "max_new_tokens": 1}).status_code == 200
    text = open_client.get("/metrics").text
    assert "taskserve_tenant_requests_total" in text and "taskserve_task_" not in text
