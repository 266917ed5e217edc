"""The deployment topology, on loopback: Redis, two replicas and the repository's docker/nginx.conf in nginx.

What docker-compose.yml runs, minus Docker (the containers themselves are not built here): tasks stick to
one replica and spread over both, a new version reaches every replica within a second, and the proxy keeps
serving every task when a replica dies. The compose files are validated with Debian's docker-compose.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from browser import chromium, console_page, sign_in
from deploy_cluster import Nginx, Replica
from peft_reference import make_adapter
from playwright.sync_api import expect
from render_nginx import NGINX_CONF, REPO, upstream_addresses

from server.engine.backbone import DEFAULT_MODEL, Backbone

ADMIN_KEY = "deploy-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
KINDS = ("lora_qv", "prompt", "ia3", "prefix")  # one task of each; the first gets a version 2
PROMPT = {"prompt": "Once upon a time", "max_new_tokens": 2}
Cluster = tuple[Nginx, list[Replica]]  # the proxy, and the replicas behind it
COMPOSE_FILES = (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"])


# ---------------------------------------------------------------------------------------------
# Static checks: compose files, Dockerfiles
# ---------------------------------------------------------------------------------------------


def compose(*files: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed: run `make install` (Debian package docker-compose)")
    args = [binary, "--project-directory", str(REPO)] + [a for f in files for a in ("-f", str(REPO / f))]
    return subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("files", COMPOSE_FILES, ids=["cpu", "gpu"])
def test_compose_files_validate(files: list[str]) -> None:
    result = compose(*files)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"redis", "server1", "server2", "proxy"} <= services.keys()
    if "docker-compose.gpu.yml" in files:
        for name in ("server1", "server2"):
            assert services[name]["build"]["dockerfile"].endswith("Dockerfile.cuda")
            devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_and_nginx_agree_on_the_replicas() -> None:
    """Every upstream of docker/nginx.conf is a compose service on the shared Redis store, and the proxy mounts it."""
    services = yaml.safe_load(compose("docker-compose.yml").stdout)["services"]
    upstreams = upstream_addresses(NGINX_CONF.read_text())
    assert upstreams == ["server1:8000", "server2:8000"]
    for address in upstreams:
        service = services[address.split(":")[0]]
        assert service["environment"]["TASKSERVE_STORE"] == "redis://redis:6379/0"
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    mounts = [volume.split(":")[:2] for volume in services["proxy"]["volumes"]]  # v1 prints SOURCE:TARGET:MODE
    assert [str(NGINX_CONF), "/etc/nginx/nginx.conf"] in mounts


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_the_repository_has(dockerfile: str) -> None:
    text = (REPO / "docker" / dockerfile).read_text()
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    sources = [s for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE) for s in line.split()[:-1]]
    assert "pyproject.toml" in sources and "server" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source not in ignored, f"{source} is in .dockerignore"
    assert re.search(r"^USER\s+(?!root)\S+", text, re.MULTILINE), "the image must run as a non-root user"
    assert "HEALTHCHECK" in text and "/health" in text


# ---------------------------------------------------------------------------------------------
# The topology on loopback
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One PEFT adapter per kind, then a second LoRA (version 2 of the first task).

    Loading the backbone here converts the default model into the shared cache once, before the replicas start.
    """
    model = Backbone.load(DEFAULT_MODEL, device="cpu").model
    root = tmp_path_factory.mktemp("adapters")
    dirs = [make_adapter(model, kind, root / f"{i}-{kind}", seed=i) for i, kind in enumerate(KINDS)]
    return [*dirs, make_adapter(model, KINDS[0], root / "v2", seed=100)]


@pytest.fixture(scope="module")
def cluster(adapter_dirs: list[Path], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("topology")
    env = {"TASKSERVE_ADMIN_KEYS": ADMIN_KEY}
    replicas = [Replica(f"replica{i + 1}", workdir, store=redis_url, env=env) for i in range(2)]
    nginx = Nginx(workdir, replicas)
    try:
        for replica in replicas:
            replica.start()  # both load the model at once
        for replica in replicas:
            replica.wait_ready()
        nginx.start()
        yield nginx, replicas
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()


@pytest.fixture(scope="module")
def proxy(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster[0].url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tasks(proxy: httpx.Client, adapter_dirs: list[Path], cluster: Cluster) -> dict[str, str]:
    """Task id -> the replica address it hashes to; fresh ids, half on each replica, each uploaded through the proxy."""
    replicas = [r.address for r in cluster[1]]
    prefix = f"topo-{secrets.token_hex(3)}"
    wanted = {address: len(KINDS) // 2 for address in replicas}
    chosen: dict[str, str] = {}
    for i in range(200):
        task_id = f"{prefix}-{i}"
        probe = proxy.get(f"/v1/tasks/{task_id}")  # an unknown task: 404, but routed like its generations
        assert probe.status_code == 404, probe.text
        upstream = probe.headers["x-upstream"]
        if wanted[upstream] > 0:
            wanted[upstream] -= 1
            chosen[task_id] = upstream
        if len(chosen) == len(KINDS):
            break
    assert len(chosen) == len(KINDS), f"no task ids hashing to both replicas: {chosen}"
    for task_id, adapter in zip(chosen, adapter_dirs):
        upload = proxy.post(f"/v1/tasks/{task_id}/versions", files=adapter_files(adapter))
        assert upload.status_code == 201, upload.text
        assert upload.json()["version"] == 1
    return chosen


def adapter_files(adapter: Path) -> list[tuple[str, tuple[str, bytes]]]:
    names = ("adapter_config.json", "adapter_model.safetensors")
    return [("files", (name, (adapter / name).read_bytes())) for name in names]


def generate(client: httpx.Client, task_id: str, *, url: str = "") -> httpx.Response:
    response = client.post(f"{url}/v1/tasks/{task_id}/generate", json=PROMPT)
    assert response.status_code == 200, response.text
    return response


def test_requests_without_a_task_spread_over_both_replicas(proxy: httpx.Client, cluster: Cluster) -> None:
    seen = {proxy.get("/health").headers["x-upstream"] for _ in range(8)}
    assert seen == {r.address for r in cluster[1]}


def test_tasks_stick_to_one_replica_and_spread_over_both(proxy: httpx.Client, tasks: dict[str, str]) -> None:
    for task_id, upstream in tasks.items():
        served = set()
        for _ in range(3):
            response = generate(proxy, task_id)
            assert response.json()["version"] == 1
            served.add(response.headers["x-upstream"])
        assert served == {upstream}, task_id
        # the OpenAI routes carry the task in the body; clients add X-Task-Id so nginx can route them alike
        assert proxy.get("/health", headers={"X-Task-Id": task_id}).headers["x-upstream"] == upstream
    assert len(set(tasks.values())) == 2


def test_server_sent_events_pass_through_the_proxy_as_they_come(proxy: httpx.Client, tasks: dict[str, str]) -> None:
    task_id = next(iter(tasks))
    body = {**PROMPT, "max_new_tokens": 16, "ignore_eos": True, "stream": True}
    arrivals: list[float] = []
    start = time.monotonic()
    with proxy.stream("POST", f"/v1/tasks/{task_id}/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                arrivals.append(time.monotonic())
    assert len(events) >= 2 and events[-1]["version"] == 1
    # unbuffered: tokens reach the client as they are generated, not in one burst at the end
    assert arrivals[-1] - arrivals[0] > 0.25 * (arrivals[-1] - start)


def test_a_new_version_reaches_every_replica_within_a_second(
    proxy: httpx.Client, tasks: dict[str, str], adapter_dirs: list[Path], cluster: Cluster
) -> None:
    task_id = next(iter(tasks))
    replicas = cluster[1]
    for replica in replicas:  # version 1 resident on both, so the swap has something to replace
        assert generate(proxy, task_id, url=replica.url).json()["version"] == 1
    upload = proxy.post(f"/v1/tasks/{task_id}/versions", files=adapter_files(adapter_dirs[-1]))
    assert upload.status_code == 201, upload.text
    assert upload.json()["version"] == 2
    uploaded = time.monotonic()
    for replica in replicas:
        while (version := generate(proxy, task_id, url=replica.url).json()["version"]) != 2:
            assert version == 1
            assert time.monotonic() - uploaded < 1.0, f"{replica.name} still serves version 1 after 1 s"
            time.sleep(0.05)
    assert generate(proxy, task_id).json()["version"] == 2


def test_the_console_works_through_the_proxy(proxy: httpx.Client, tasks: dict[str, str], cluster: Cluster) -> None:
    """Relative URLs, one asset digest on every replica, streams unbuffered, task calls sent to the task's replica."""
    nginx, replicas = cluster
    digests = {re.search(r"assets/([0-9a-f]+)/", httpx.get(f"{r.url}/console/").text)[1] for r in replicas}
    assert len(digests) == 1  # a page from one replica loads its assets from any other
    task_id = next(iter(tasks))
    with chromium() as browser, console_page(browser, nginx.url) as page:
        page.goto("/")
        expect(page).to_have_url(f"{nginx.url}/console/")
        sign_in(page, ADMIN_KEY, f"#/tasks?q={task_id.rsplit('-', 1)[0]}")
        expect(page.locator("#task-table tbody tr")).to_have_count(len(tasks))
        page.goto(f"/console/#/playground?a={task_id}&b=base")
        page.fill("#prompt", "Once upon a time")
        page.fill("#s-max-new-tokens", "4")
        page.click("#run")
        expect(page.locator("#stats-a .finish")).to_have_text(re.compile(r"· v\d+$"))
        expect(page.locator("#stats-b .finish")).to_contain_text("base")
        page.goto(f"/console/#/tasks/{task_id}")  # last use is known only on the task's replica: X-Task-Id got there
        expect(page.locator("#last-use")).to_have_text(re.compile(r"ago|just now"))


def test_the_proxy_keeps_serving_every_task_when_a_replica_dies(
    proxy: httpx.Client, tasks: dict[str, str], cluster: Cluster
) -> None:
    """Last in this module: it kills a replica, with a generation in flight on it."""
    dead, survivor = cluster[1]
    versions = {task_id: proxy.get(f"/v1/tasks/{task_id}").json()["version"] for task_id in tasks}
    doomed = next(task_id for task_id, upstream in tasks.items() if upstream == dead.address)
    body = {"prompt": "Once upon a time", "max_new_tokens": 200, "ignore_eos": True}  # seconds on a CPU
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(proxy.post, f"/v1/tasks/{doomed}/generate", json=body)
        time.sleep(1.0)  # sent, and not answered: a non-streamed answer comes at the end
        assert not in_flight.done()
        dead.kill()
        retried = in_flight.result()
    # inference has no side effects: nginx sent it again to the next replica instead of answering 502
    assert retried.status_code == 200, retried.text
    assert retried.headers["x-upstream"] == f"{dead.address}, {survivor.address}"
    assert retried.json()["usage"]["completion_tokens"] == 200
    for _ in range(2):  # the first request may try the dead replica first; the second knows it is down
        for task_id in tasks:
            response = generate(proxy, task_id)
            assert response.headers["x-upstream"].split(", ")[-1] == survivor.address
            assert response.json()["version"] == versions[task_id]
        health = proxy.get("/health")
        assert health.status_code == 200 and health.headers["x-upstream"].endswith(survivor.address)


def test_only_inference_is_retried_after_reaching_a_replica() -> None:
    """An upload, rollback or delete that reached a replica must never be sent again (it would apply twice)."""
    conf = NGINX_CONF.read_text()
    retried = re.findall(r"^\s*location ([^{]+)\{[^}]*non_idempotent", conf, re.MULTILINE)
    assert [pattern.strip() for pattern in retried] == ["~ ^/v1/(completions|chat/completions|tasks/[^/]+/generate)$"]
    directives = re.findall(r"^\s*proxy_next_upstream\s[^;]*;", conf, re.MULTILINE)
    assert len(directives) == 2 and sum("non_idempotent" in d for d in directives) == 1
