"""Residency: a bounded device cache over the store, leases that pin, hot swap across replicas."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
from peft_reference import make_adapter, peft_greedy, tiny_llama
from redis_server import RedisServer

from adapters_store import StoreUnavailable, open_store
from server.engine.adapters import read_peft_dir
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, UnknownTask
from server.engine.residency import Residency, ResidencyFull
from server.engine.sampling import SamplingParams

PROMPT = (5, 17, 33, 8, 91, 4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = tiny_llama()
    root = tmp_path_factory.mktemp("residency")
    dirs = {name: make_adapter(model, "lora_all", root / name, seed=i) for i, name in enumerate("abc")}
    dirs["prefix"] = make_adapter(model, "prefix", root / "prefix", seed=7)
    return model, dirs


def backbone(model) -> Backbone:
    return Backbone(copy.deepcopy(model), None, name="tiny")


def files(path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def eventually(check, timeout: float = 1.0):
    """Poll until `check()` is truthy; hot swap promises one second."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (UnknownTask, AssertionError):
            pass
        if time.monotonic() > deadline:
            return check()
        time.sleep(0.02)


def test_eviction_is_lru_respects_pins_and_frees_memory(env):
    model, dirs = env
    store = open_store("memory://")
    uploader = Residency(backbone(model), store)
    for name in "abc":
        uploader.upload(name, files(dirs[name]))
    one = uploader.stats.device_bytes // 3
    residency = Residency(backbone(model), store, device_bytes=int(2.5 * one))  # room for two
    a, b = residency.acquire("a"), residency.acquire("b")
    assert residency.stats.device_bytes == 2 * one
    with pytest.raises(ResidencyFull):  # both residents are pinned by running requests
        residency.acquire("c")
    slots = a.adapter.slots
    a.release()
    c = residency.acquire("c")  # evicts a, the least recently used unpinned version
    assert residency.stats.evictions == 1 and not residency.is_resident("a", 1)
    assert residency.is_resident("b", 1) and residency.is_resident("c", 1)
    assert c.adapter.slots == slots, "an evicted adapter's pool slots must be freed (and are reused first)"
    b.release(), c.release()
    for name in "abc":
        residency.delete(name)
    assert residency.stats.device_bytes == 0 and residency.stats.resident == 0


def test_a_version_larger_than_the_budget_is_refused(env):
    model, dirs = env
    residency = Residency(backbone(model), device_bytes=1000)
    with pytest.raises(ResidencyFull, match="budget"):
        residency.upload("a", files(dirs["a"])) and residency.acquire("a")


def test_concurrent_requests_for_a_cold_task_load_it_once(env):
    model, dirs = env
    store = open_store("memory://")
    Residency(backbone(model), store).upload("a", files(dirs["a"]))
    replica = Residency(backbone(model), store)  # cold: it never saw the upload's tensors
    fetches = []
    get = store.get
    store.get = lambda *args: fetches.append(args) or get(*args)
    leases = []
    threads = [threading.Thread(target=lambda: leases.append(replica.acquire("a"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetches) == 1 and replica.stats.loads == 1
    assert len({id(lease.adapter) for lease in leases}) == 1


def test_hot_swap_and_delete_reach_another_replica_within_a_second(env, tmp_path):
    model, dirs = env
    url = f"file://{tmp_path / 'store'}"
    first = Residency(backbone(model), open_store(url))
    second = Residency(backbone(model), open_store(url))
    first.upload("task", files(dirs["a"]))
    running = second.acquire("task")  # a row running on version 1
    assert running.adapter.key == "task@1"
    first.upload("task", files(dirs["b"]))
    assert eventually(lambda: second.get("task").key == "task@2")
    assert running.adapter.key == "task@1" and second.is_resident("task", 1)  # pinned until the row ends
    running.release()
    assert not second.is_resident("task", 1)
    first.delete("task")
    assert eventually(lambda: _raises_unknown(second, "task"))
    for r in (first, second):
        r.close()


def _raises_unknown(residency: Residency, task_id: str) -> bool:
    try:
        residency.acquire(task_id).release()
    except UnknownTask:
        return True
    return False


def test_rollback_serves_the_older_version(env):
    model, dirs = env
    residency = Residency(backbone(model))
    residency.upload("task", files(dirs["a"]))
    residency.upload("task", files(dirs["b"]))
    residency.rollback("task", 1)
    assert residency.get("task").key == "task@1"


def test_redis_outage_keeps_resident_tasks_serving_and_recovers(env, tmp_path):
    model, dirs = env
    redis_server = RedisServer(tmp_path, persistent=True)  # like production: Redis keeps its data across restarts
    redis_server.start()
    store = open_store(redis_server.url)
    store_of_other_replica = open_store(redis_server.url)
    residency = Residency(backbone(model), store)
    residency.upload("warm", files(dirs["prefix"]))
    engine = Engine(residency._backbone, residency=residency).start()
    request = GenerationRequest(PROMPT, SamplingParams(max_new_tokens=6), task_id="warm")
    expected = peft_greedy(model, dirs["prefix"], list(PROMPT), 6)
    try:
        redis_server.stop()
        assert engine.complete(request, timeout=30).token_ids == expected  # served from the device cache
        with pytest.raises(StoreUnavailable):
            residency.acquire("cold")
        redis_server.start()
        store_of_other_replica.put(
            "warm", files(dirs["a"]), kind="lora", parameters=1, backbone=residency._backbone.geometry.fingerprint
        )
        # the watcher reconnects by itself and resyncs: the new version is served without a restart
        assert eventually(lambda: residency.get("warm").key.endswith("@2"), timeout=10)
    finally:
        engine.stop()
        residency.close()
        redis_server.stop()


def test_engine_rows_keep_their_version_across_a_hot_swap(env):
    model, dirs = env
    engine = Engine(backbone(model))
    engine.residency.register("task", *read_peft_dir(dirs["a"]))
    old = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=8), task_id="task"), lambda d: None)
    engine.step()
    engine.residency.register("task", *read_peft_dir(dirs["b"]))
    new = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=8), task_id="task"), lambda d: None)
    engine.run_until_idle()
    assert old.output_ids == peft_greedy(model, dirs["a"], list(PROMPT), 8)
    assert new.output_ids == peft_greedy(model, dirs["b"], list(PROMPT), 8)
    assert not engine.residency.is_resident("task", 1)  # the old version left with its last row


async def test_a_request_cancelled_while_pinning_leaves_no_pin(env):
    model, dirs = env
    residency = Residency(backbone(model))
    residency.upload("task", files(dirs["a"]))
    pin = residency._pin
    residency._pin = lambda task_id: (time.sleep(0.2), pin(task_id))[1]  # a slow store lookup
    waiting = asyncio.ensure_future(residency.acquire_async("task"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.4)
    residency._pin = pin
    residency.delete("task")  # an unpinned version leaves at once
    assert not residency.is_resident("task", 1) and residency.stats.device_bytes == 0
