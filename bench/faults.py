"""Fault tests on loopback: Redis going down, `kill -9` in the middle of an upload, a replica dying behind the proxy,
and huge prompts sent while the probes are watched.

    python bench/faults.py                 # all four, about 5 minutes on two cores
    python bench/faults.py redis kill9     # some of them

Each prints what a client saw, in numbers, for docs/reliability.md. It starts its own processes (redis-server,
`python -m server`, Debian's nginx on docker/nginx.conf) with the test suite's helpers (tests/redis_server.py,
tests/deploy/deploy_cluster.py), on free loopback ports, and stops them.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "deploy")]

from deploy_cluster import Nginx, Replica  # noqa: E402
from redis_server import RedisServer  # noqa: E402

TEMPLATE = {"template": {"instruction": "Answer with the capital city only.", "input_prefix": "Country: "}}
GENERATE = {"prompt": "France", "max_new_tokens": 4}


def wait_for(predicate, timeout: float = 60.0, step: float = 0.1) -> float:
    """Seconds until `predicate()` holds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError("timed out")
        time.sleep(step)
    return time.monotonic() - started


def status(response: httpx.Response) -> str:
    kind = response.json().get("error", {}).get("type") if response.status_code >= 400 else None
    return f"{response.status_code} {kind}" if kind else str(response.status_code)


def redis_down(work: Path) -> None:
    print("\n## Redis down, then back\n")
    redis = RedisServer(work, persistent=True)
    redis.start()
    replica = Replica("replica", work, store=redis.url, env={})
    replica.start()
    replica.wait_ready()
    http = httpx.Client(base_url=replica.url, timeout=30)
    try:
        assert http.post("/v1/tasks/capitals/versions", json=TEMPLATE).status_code == 201
        assert http.post("/v1/tasks/capitals/generate", json=GENERATE).status_code == 200  # resident now
        redis.proc.send_signal(signal.SIGKILL)
        redis.proc.wait()
        redis.proc = None
        noticed = wait_for(lambda: http.get("/ready").status_code == 503)
        started = time.perf_counter()
        ready = http.get("/ready")
        rows = [
            ("GET /ready", f"{status(ready)} in {(time.perf_counter() - started) * 1000:.0f} ms: {ready.json()}"),
            ("generate with the resident task", status(http.post("/v1/tasks/capitals/generate", json=GENERATE))),
            ("generate with base", status(http.post("/v1/tasks/base/generate", json=GENERATE))),
            ("GET /v1/tasks", status(http.get("/v1/tasks"))),
            ("upload a new task", status(http.post("/v1/tasks/other/versions", json=TEMPLATE))),
            ("/ready turned 503 after", f"{noticed:.1f} s"),
        ]
        redis.start()
        recovered = wait_for(lambda: http.get("/ready").status_code == 200)
        tasks = http.get("/v1/tasks").json()["tasks"]
        rows += [
            ("/ready back to 200 after Redis restarted", f"{recovered:.1f} s"),
            ("tasks after the restart", ", ".join(f"{t['task_id']}@{t['version']}" for t in tasks)),
            ("upload after the restart", status(http.post("/v1/tasks/other/versions", json=TEMPLATE))),
        ]
        table(rows)
    finally:
        http.close()
        replica.stop()
        redis.stop()


def big_lora(out: Path) -> Path:
    """A LoRA on every linear layer of the default model, rank 64: about 75 MB of safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

    model = AutoModelForCausalLM.from_pretrained(default_cache_dir() / DEFAULT_MODEL)
    peft = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft.save_pretrained(out, safe_serialization=True)
    return out


def kill9_mid_upload(work: Path, rounds: int = 8) -> None:
    print(f"\n## kill -9 during an upload, {rounds} times (disk store)\n")
    lora = big_lora(work / "lora")
    files = [("files", (n, (lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    size = sum(len(f[1][1]) for f in files)
    store = work / "store"
    replica = Replica("kill9", work, store=f"file://{store}", env={})
    replica.start()
    replica.wait_ready()
    with httpx.Client(base_url=replica.url, timeout=300) as http:
        started = time.monotonic()
        assert http.post("/v1/tasks/big/versions", files=files).status_code == 201
        upload_s = time.monotonic() - started  # the kills land within this: sending, validating or storing
    rng = random.Random(0)
    outcomes = Counter()
    for round_ in range(rounds):
        answered: list[httpx.Response | Exception] = []
        upload = threading.Thread(target=_upload, args=(replica.url, files, str(round_), answered))
        upload.start()
        time.sleep(rng.uniform(0.05, upload_s))
        replica.kill()
        upload.join()
        debris = len(list((store / "tmp").iterdir()))  # staging dirs the kill left behind
        replica.start()
        replica.wait_ready()
        with httpx.Client(base_url=replica.url, timeout=60) as http:
            info = http.get("/v1/tasks/big").json()
            served = http.post("/v1/tasks/big/generate", json=GENERATE).status_code
        leftovers = list((store / "tmp").iterdir())
        stored = [v["version"] for v in info["versions"]]
        acknowledged = bool(answered) and isinstance(answered[0], httpx.Response) and answered[0].status_code == 201
        intact = served == 200 and not leftovers and (not acknowledged or info["version"] == stored[-1])
        outcomes["intact" if intact else "NOT intact"] += 1
        outcomes["acknowledged before the kill" if acknowledged else "killed before the answer"] += 1
        print(
            f"round {round_ + 1}: killed {'after the 201' if acknowledged else 'before an answer'}, "
            f"{debris} staging dir(s) left by the kill, {len(leftovers)} after the restart; "
            f"versions {stored}, current {info['version']}, generate {served}"
        )
    replica.stop()
    print(f"\n{size / 1e6:.0f} MB upload; " + ", ".join(f"{k}: {v}" for k, v in outcomes.items()))


def _upload(url: str, files, description: str, answered: list) -> None:
    try:
        with httpx.Client(base_url=url, timeout=300) as http:
            answered.append(http.post("/v1/tasks/big/versions", files=files, data={"description": description}))
    except httpx.HTTPError as exc:
        answered.append(exc)


def replica_killed(work: Path, redis_url: str) -> None:
    print("\n## a replica killed behind the proxy, with generations in flight\n")
    replicas = [Replica(f"replica{i}", work, store=redis_url, env={}) for i in (1, 2)]
    nginx = Nginx(work, replicas)
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.wait_ready()
    nginx.start()
    long = {"prompt": "Once upon a time", "max_new_tokens": 64, "ignore_eos": True}
    try:
        with httpx.Client(base_url=nginx.url, timeout=120) as http, ThreadPoolExecutor(16) as pool:
            for _ in range(8):  # warm both replicas' kept-alive upstream connections
                http.post("/v1/tasks/base/generate", json=GENERATE)
            in_flight = [pool.submit(http.post, "/v1/tasks/base/generate", json=long) for _ in range(12)]
            time.sleep(1.0)
            replicas[0].kill()
            after = []  # one at a time: what a client sees right after, not what an overloaded survivor says
            for _ in range(24):
                after.append(pool.submit(http.post, "/v1/tasks/base/generate", json=GENERATE))
                after[-1].exception()
            rows = []
            for name, futures in (("in flight when it died", in_flight), ("sent after", after)):
                seen = Counter()
                for future in futures:
                    try:
                        response = future.result()
                        retried = "retried, " if "," in response.headers.get("x-upstream", "") else ""
                        seen[f"{retried}{response.status_code}"] += 1
                    except httpx.HTTPError as exc:
                        seen[type(exc).__name__] += 1
                rows.append((name, ", ".join(f"{k}: {v}" for k, v in sorted(seen.items()))))
            table(rows)
    finally:
        nginx.stop()
        for replica in replicas:
            replica.stop()


def huge_prompts(work: Path) -> None:
    print("\n## huge prompts, with /health probed every 50 ms\n")
    replica = Replica("huge", work, store="memory://", env={})
    replica.start()
    replica.wait_ready()
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=replica.url, timeout=60) as http:
            while not done.is_set():
                started = time.perf_counter()
                http.get("/health")
                probes.append(time.perf_counter() - started)
                time.sleep(0.05)

    watcher = threading.Thread(target=probe)
    watcher.start()
    rows = []
    try:
        with httpx.Client(base_url=replica.url, timeout=120) as http:
            for size in (20_000_000, 2_000_000):  # over the 2 MiB body limit, and just under it
                body = json.dumps({"prompt": "lorem ipsum " * (size // 12), "max_new_tokens": 4})
                probes.clear()
                started = time.perf_counter()
                response = http.post(
                    "/v1/tasks/base/generate", content=body, headers={"content-type": "application/json"}
                )
                took = time.perf_counter() - started
                slowest = max(probes, default=0.0) * 1000
                rows.append(
                    (
                        f"a {len(body) / 1e6:.0f} MB prompt",
                        f"{status(response)} after {took:.2f} s; "
                        f"/health at most {slowest:.0f} ms meanwhile ({len(probes)} probes)",
                    )
                )
    finally:
        done.set()
        watcher.join()
        replica.stop()
    table(rows)


def table(rows: list[tuple[str, str]]) -> None:
    print("| what | result |\n|---|---|")
    for what, result in rows:
        print(f"| {what} | {json.dumps(result) if not isinstance(result, str) else result} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=["redis", "kill9", "proxy", "huge"], default=[])
    chosen = parser.parse_args().scenarios or ["redis", "kill9", "proxy", "huge"]
    with tempfile.TemporaryDirectory(prefix="taskserve-faults-") as tmp:
        work = Path(tmp)
        if "redis" in chosen:
            (work / "redis").mkdir()
            redis_down(work / "redis")
        if "kill9" in chosen:
            (work / "kill9").mkdir()
            kill9_mid_upload(work / "kill9")
        if "huge" in chosen:
            (work / "huge").mkdir()
            huge_prompts(work / "huge")
        if "proxy" in chosen:
            (work / "proxy").mkdir()
            redis = RedisServer(work / "proxy")
            redis.start()
            try:
                replica_killed(work / "proxy", redis.url)
            finally:
                redis.stop()


if __name__ == "__main__":
    main()
