"""Tenants: namespaces, keys kept as digests, cross-tenant 404s, grants, quotas (429), revocation across replicas."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from live_server import ADMIN_KEY, bearer
from redis_server import RedisServer

from server.api.quotas import OverQuota, Quotas
from server.app import create_app
from server.config import Settings
from server.tenants import Caller, KeyRecord, Quota, Tenant

TEMPLATE = {"template": {"instruction": "Answer in one word."}}
ROOT = bearer(ADMIN_KEY)


def app_on(store: str, backbone) -> TestClient:
    return TestClient(create_app(Settings(store=store, admin_keys=[ADMIN_KEY]), backbone=backbone))


def new_key(client: TestClient, tenant: str, **fields) -> dict[str, str]:
    created = client.post("/v1/admin/keys", json={"tenant": tenant, **fields}, headers=ROOT)
    assert created.status_code == 201, created.text
    return bearer(created.json()["key"])


def generate(client: TestClient, task_id: str, key: dict[str, str]):
    return client.post(f"/v1/tasks/{task_id}/generate", json={"prompt": "Sky?", "max_new_tokens": 2}, headers=key)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tenants")


@pytest.fixture(scope="module")
def client(backbone, store_dir: Path):
    with app_on(f"file://{store_dir}", backbone) as client:
        yield client


def test_a_key_sees_and_calls_only_its_tenants_tasks_and_its_grants(client):
    a_admin, b = new_key(client, "team-a", scope="admin"), new_key(client, "team-b")
    assert client.post("/v1/tasks/team-a/faq/versions", json=TEMPLATE, headers=a_admin).status_code == 201
    assert client.post("/v1/tasks/shared/versions", json=TEMPLATE, headers=ROOT).status_code == 201
    assert generate(client, "team-a/faq", a_admin).status_code == 200
    assert [t["task_id"] for t in client.get("/v1/tasks", headers=a_admin).json()["tasks"]] == ["team-a/faq"]

    for answer in (client.get("/v1/tasks/team-a/faq", headers=b), generate(client, "team-a/faq", b)):
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "unknown_task"  # as if missing
    assert client.get("/v1/tasks", headers=b).json()["tasks"] == []
    assert [m["id"] for m in client.get("/v1/models", headers=b).json()["data"]][1:] == []
    chat = {"model": "team-a/faq", "messages": [{"role": "user", "content": "Sky?"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=chat, headers=b).status_code == 404

    # a tenant's admin key writes only its own namespace: elsewhere, what it cannot see is missing
    for task_id in ("team-b/x", "shared"):
        refused = client.post(f"/v1/tasks/{task_id}/versions", json=TEMPLATE, headers=a_admin)
        assert refused.status_code == 404, refused.text
    assert client.delete("/v1/tasks/shared", headers=a_admin).status_code == 404
    assert client.get("/v1/tasks/shared", headers=ROOT).status_code == 200  # still there

    granted = {"grants": ["team-a/faq", "shared"]}
    assert client.put("/v1/admin/tenants/team-b", json=granted, headers=ROOT).status_code == 200
    time.sleep(0.6)  # tenant records are cached for half a second
    assert generate(client, "team-a/faq", b).status_code == 200
    assert [t["task_id"] for t in client.get("/v1/tasks", headers=b).json()["tasks"]] == ["shared", "team-a/faq"]
    assert client.get("/v1/tasks", headers=ROOT).json()["tasks"][-1]["task_id"] == "team-a/faq"  # globals see all


def test_keys_are_stored_as_digests_listed_without_secrets_and_admin_routes_need_a_bootstrap_key(client, store_dir):
    created = client.post("/v1/admin/keys", json={"tenant": "team-c", "scope": "admin"}, headers=ROOT).json()
    key = created["key"]
    stored = b"".join(p.read_bytes() for p in (store_dir / "access").rglob("*.json"))
    assert key.encode() not in stored and created["id"].encode() in stored
    listed = client.get("/v1/admin/keys", params={"tenant": "team-c"}, headers=ROOT).json()["keys"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    tenant_admin = bearer(key)
    assert client.get("/v1/admin/keys", headers=tenant_admin).status_code == 403
    assert client.post("/v1/admin/keys", json={"tenant": "BAD/"}, headers=ROOT).status_code in (400, 422)
    assert client.delete(f"/v1/admin/keys/{created['id']}", headers=ROOT).status_code == 204
    time.sleep(0.6)
    assert client.get("/v1/tasks", headers=tenant_admin).status_code == 401
    assert client.delete(f"/v1/admin/keys/{created['id']}", headers=ROOT).status_code == 404


def test_over_quota_is_429_with_retry_after_and_rate_limit_headers(client):
    slow = new_key(client, "team-q", requests_per_s=1)
    assert client.post("/v1/tasks/team-q/t/versions", json=TEMPLATE, headers=ROOT).status_code == 201
    assert generate(client, "team-q/t", slow).status_code == 200
    refused = generate(client, "team-q/t", slow)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    time.sleep(1.0)
    assert generate(client, "team-q/t", slow).status_code == 200  # refilled

    thrifty = new_key(client, "team-q", tokens_per_min=2)  # one request (3 tokens) overdraws it
    assert generate(client, "team-q/t", thrifty).status_code == 200
    refused = generate(client, "team-q/t", thrifty)
    assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-tokens"] == "2"


def test_running_rows_per_tenant_are_bounded():
    quotas = Quotas()
    tenant = Tenant("team-r", quota=Quota(running=1))
    caller = Caller(admin=False, key=KeyRecord("k", "k" * 64, "team-r", "inference", Quota(), 0.0), tenant=tenant)
    first = quotas.admit(caller)
    with pytest.raises(OverQuota, match="limit of 1"):
        quotas.admit(caller)
    first.release(10)
    quotas.admit(caller).release()


def test_an_open_server_still_needs_no_key(open_client):
    assert open_client.get("/v1/tasks").status_code == 200
    assert open_client.post("/v1/tasks/base/generate", json={"prompt": "Hi", "max_new_tokens": 1}).status_code == 200


def test_revocation_reaches_every_replica_within_a_second(backbone, tmp_path):
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        with app_on(redis.url, backbone) as first, app_on(redis.url, backbone) as second:
            created = first.post("/v1/admin/keys", json={"tenant": "team-z"}, headers=ROOT).json()
            key = bearer(created["key"])
            assert second.get("/v1/tasks", headers=key).status_code == 200  # the other replica knows it at once
            assert first.delete(f"/v1/admin/keys/{created['id']}", headers=ROOT).status_code == 204
            revoked = time.monotonic()
            while second.get("/v1/tasks", headers=key).status_code != 401:
                assert time.monotonic() - revoked < 1.0, "the revoked key still works on the other replica"
                time.sleep(0.05)
    finally:
        redis.stop()


def test_quotas_on_redis_are_enforced_by_every_replica_together(backbone, tmp_path):
    import redis as redis_client

    server = RedisServer(tmp_path)
    server.start()
    try:
        with app_on(server.url, backbone) as first, app_on(server.url, backbone) as second:
            assert first.post("/v1/tasks/team-s/t/versions", json=TEMPLATE, headers=ROOT).status_code == 201
            once = new_key(first, "team-s", requests_per_s=0.01)  # one request, then one per 100 s
            assert generate(first, "team-s/t", once).status_code == 200
            refused = generate(second, "team-s/t", once)  # the other replica counts in the same bucket
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"
            assert refused.headers["x-ratelimit-limit-requests"] == "0.01"
            assert int(refused.headers["retry-after"]) > 90

            created = second.post("/v1/admin/keys", json={"tenant": "team-s", "tokens_per_min": 2}, headers=ROOT)
            thrifty = bearer(created.json()["key"])
            assert generate(second, "team-s/t", thrifty).status_code == 200  # its tokens overdraw the minute's 2
            bucket = f"ts:bucket:key:{created.json()['id']}:tokens"
            with redis_client.Redis.from_url(server.url) as peek:  # the charge lands after the answer, off the loop
                deadline = time.monotonic() + 10
                while float(peek.hget(bucket, "level") or 1) >= 0:
                    assert time.monotonic() < deadline, "the tokens were never charged in Redis"
                    time.sleep(0.02)
            refused = generate(first, "team-s/t", thrifty)
            assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-tokens"] == "2"
    finally:
        server.stop()
