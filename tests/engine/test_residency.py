"""Residency: a bounded device cache over the store, leases that pin, loads that reserve their bytes, hot swap
across replicas (through the task layer)."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from dataclasses import replace

import pytest
from peft_reference import make_adapter, peft_greedy, tiny_llama
from redis_server import RedisServer
from serving import serve

from adapters_store import AdapterKey, StoreUnavailable, TaskNotFound, open_store
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.residency import AdapterTooLarge, Residency, ResidencyFull
from server.engine.sampling import SamplingParams
from server.tasks import TaskService

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
        except (TaskNotFound, AssertionError):
            pass
        if time.monotonic() > deadline:
            return check()
        time.sleep(0.02)


def replica(model, store=None, **budgets) -> tuple[Residency, TaskService]:
    """One server's device cache and task layer over `store`."""
    residency = Residency(backbone(model), store, **budgets)
    return residency, TaskService(residency.store, residency)


def test_eviction_is_lru_respects_pins_and_frees_memory(env):
    model, dirs = env
    store = open_store("memory://")
    uploader, tasks = replica(model, store)
    for name in "abc":
        tasks.upload(name, files(dirs[name]))
    assert uploader.stats.device_bytes == 0, "an upload waits in the host tier for its first request"
    one = uploader.validate(A, files(dirs["a"]))
    residency = Residency(backbone(model), store, device_bytes=int(2.5 * one))  # room for two
    a, b = residency.acquire(A), residency.acquire(B)
    assert residency.stats.device_bytes == 2 * one
    with pytest.raises(ResidencyFull):  # both residents are pinned by running requests
        residency.acquire(C)
    assert residency.is_resident(A) and residency.is_resident(B), "a load that cannot fit evicts nothing"
    slots = a.adapter.slots
    a.release()
    c = residency.acquire(C)  # evicts a, the least recently used unpinned version
    assert residency.stats.evictions == 1 and not residency.is_resident(A)
    assert residency.is_resident(B) and residency.is_resident(C)
    assert c.adapter.slots == slots, "an evicted adapter's pool slots must be freed (and are reused first)"
    b.release(), c.release()
    for name in "abc":
        residency.retire(name)
    assert residency.stats.device_bytes == 0 and residency.stats.resident == 0


def test_two_loads_that_together_exceed_the_budget_never_both_become_resident(env):
    model, dirs = env
    store = open_store("memory://")
    uploader, tasks = replica(model, store)
    for name in "ab":
        tasks.upload(name, files(dirs[name]))
    one = uploader.validate(A, files(dirs["a"]))  # a and b are the same size
    residency = Residency(backbone(model), store, device_bytes=int(1.5 * one))
    both_materialised = threading.Barrier(2, timeout=10)
    materialise = residency._materialise

    def in_step(*args, **kwargs):  # both loads are past the store and hold their tensors before either makes room
        adapter = materialise(*args, **kwargs)
        both_materialised.wait()
        return adapter

    residency._materialise = in_step
    outcomes: dict[str, object] = {}

    def request(key: AdapterKey) -> None:
        try:
            outcomes[key.task_id] = residency.acquire(key, timeout=10)  # held: a running row pins it
        except ResidencyFull as exc:
            outcomes[key.task_id] = exc

    threads = [threading.Thread(target=request, args=(key,)) for key in (A, B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    leases = [o for o in outcomes.values() if not isinstance(o, Exception)]
    assert len(leases) == 1 and sum(isinstance(o, ResidencyFull) for o in outcomes.values()) == 1
    assert residency.stats.device_bytes <= residency.device_budget
    assert [residency.is_resident(k) for k in (A, B)].count(True) == 1


def test_an_adapter_larger_than_the_whole_budget_is_refused_at_upload(env):
    model, dirs = env
    residency, tasks = replica(model, device_bytes=1000)
    with pytest.raises(AdapterTooLarge, match="1000 bytes"):
        tasks.upload("a", files(dirs["a"]))
    with pytest.raises(TaskNotFound):  # nothing was stored
        tasks.info("a")


def test_a_version_stored_before_the_budget_shrank_fails_for_good_not_retry(env):
    model, dirs = env
    store = open_store("memory://")
    replica(model, store)[1].upload("a", files(dirs["a"]))
    residency = Residency(backbone(model), store, device_bytes=1000)  # a restart with a smaller budget
    with pytest.raises(AdapterTooLarge, match="device adapter budget"):
        residency.acquire(A)
    assert residency.stats.device_bytes == 0 and not residency.is_resident(A)


def test_concurrent_requests_for_a_cold_task_load_it_once(env):
    model, dirs = env
    store = open_store("memory://")
    replica(model, store)[1].upload("a", files(dirs["a"]))
    cold = Residency(backbone(model), store)  # it never saw the upload's files
    fetches = []
    get = store.get
    store.get = lambda *args: fetches.append(args) or get(*args)
    leases = []
    threads = [threading.Thread(target=lambda: leases.append(cold.acquire(A))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetches) == 1 and cold.stats.loads == 1
    assert len({id(lease.adapter) for lease in leases}) == 1


def test_hot_swap_and_delete_reach_another_replica_within_a_second(env, tmp_path):
    model, dirs = env
    url = f"file://{tmp_path / 'store'}"
    _, first = replica(model, open_store(url))
    second_cache, second = replica(model, open_store(url))
    first.upload("task", files(dirs["a"]))
    running = second_cache.acquire(second.current_key("task"))  # a row running on version 1
    assert running.adapter.key == AdapterKey("task", 1)
    first.upload("task", files(dirs["b"]))
    assert eventually(lambda: second.current_key("task") == AdapterKey("task", 2))
    assert running.adapter.key == AdapterKey("task", 1) and second_cache.is_resident(AdapterKey("task", 1))
    running.release()  # pinned until the row ends, then gone
    assert not second_cache.is_resident(AdapterKey("task", 1))
    first.delete("task")
    assert eventually(lambda: _raises_unknown(second, "task"))
    for t in (first, second):
        t.close()


def _raises_unknown(tasks: TaskService, task_id: str) -> bool:
    try:
        tasks.current_key(task_id)
    except TaskNotFound:
        return True
    return False


def test_rollback_serves_the_older_version(env):
    model, dirs = env
    residency, tasks = replica(model)
    tasks.upload("task", files(dirs["a"]))
    tasks.upload("task", files(dirs["b"]))
    tasks.rollback("task", 1)
    assert residency.get(tasks.current_key("task")).key == AdapterKey("task", 1)


def test_redis_outage_keeps_resident_tasks_serving_and_recovers(env, tmp_path):
    model, dirs = env
    redis_server = RedisServer(tmp_path, persistent=True)  # like production: Redis keeps its data across restarts
    redis_server.start()
    store = open_store(redis_server.url)
    store_of_other_replica = open_store(redis_server.url)
    residency, tasks = replica(model, store)
    tasks.upload("warm", files(dirs["prefix"]))
    engine = Engine(residency._backbone, residency=residency, resolve=tasks.key).start()
    request = GenerationRequest(PROMPT, SamplingParams(max_new_tokens=6), task_id="warm")
    expected = peft_greedy(model, dirs["prefix"], list(PROMPT), 6)
    try:
        assert engine.complete(request, timeout=30).token_ids == expected  # now on the device
        redis_server.stop()
        assert engine.complete(request, timeout=30).token_ids == expected  # served from the device cache
        with pytest.raises(StoreUnavailable):
            tasks.current_key("cold")
        redis_server.start()
        store_of_other_replica.put("warm", files(dirs["a"]), kind="lora", parameters=1, backbone=residency.fingerprint)
        # the watcher reconnects by itself and resyncs: the new version is served without a restart
        assert eventually(lambda: tasks.current_key("warm") == AdapterKey("warm", 2), timeout=10)
    finally:
        engine.stop()
        tasks.close()
        residency.close()
        redis_server.stop()


def test_engine_rows_keep_their_version_across_a_hot_swap(env):
    model, dirs = env
    engine = Engine(backbone(model))
    serve(engine.residency, "task", dirs["a"])
    old = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=8), task_id="task"), lambda d: None)
    engine.step()
    serve(engine.residency, "task", dirs["b"])
    new = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=8), task_id="task"), lambda d: None)
    engine.run_until_idle()
    assert old.output_ids == peft_greedy(model, dirs["a"], list(PROMPT), 8)
    assert new.output_ids == peft_greedy(model, dirs["b"], list(PROMPT), 8)
    assert not engine.residency.is_resident(AdapterKey("task", 1))  # the old version left with its last row


async def test_a_request_cancelled_while_its_task_loads_leaves_no_pin(env):
    model, dirs = env
    residency, tasks = replica(model)
    tasks.upload("task", files(dirs["a"]))
    materialise = residency._materialise
    residency._materialise = lambda *args: (time.sleep(0.2), materialise(*args))[1]  # a slow load
    waiting = asyncio.ensure_future(residency.acquire_async(tasks.current_key("task")))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.4)
    assert residency.is_resident(AdapterKey("task", 1))  # the load finished for the next request...
    tasks.delete("task")  # ...but nobody pins it: it leaves at once
    assert not residency.is_resident(AdapterKey("task", 1)) and residency.stats.device_bytes == 0


A, B, C = (AdapterKey(name, 1) for name in "abc")


@pytest.mark.parametrize("kind", ["prefix", "llama_adapter"])
def test_a_load_reaches_the_device_only_once_its_bytes_are_reserved(env, tmp_path, kind):
    """Staged on the host, reserved, then moved (LLaMA-Adapter projected again on the device, as PEFT does)."""
    import torch

    model, dirs = env
    path = dirs["prefix"] if kind == "prefix" else make_adapter(model, kind, tmp_path / kind, seed=3)
    store = open_store("memory://")
    replica(model, store)[1].upload(kind, files(path))
    residency = Residency(backbone(model), store)
    accelerator = torch.device("meta")  # stands for the GPU: its tensors hold no data, so they show where they live
    residency._placement = replace(residency._placement, device=accelerator)
    events: list[str] = []
    materialise, make_room = residency._materialise, residency._make_room

    def spy_materialise(key, version_files, placement, *rest):
        events.append(f"materialise on {placement.device.type}")
        return materialise(key, version_files, placement, *rest)

    def spy_make_room(entry, nbytes):
        events.append("reserve")
        return make_room(entry, nbytes)

    residency._materialise, residency._make_room = spy_materialise, spy_make_room
    adapter = residency.get(AdapterKey(kind, 1))
    again = ["materialise on meta"] if kind == "llama_adapter" else []
    assert events == ["materialise on cpu", "reserve", *again]
    on_device = (
        [adapter.prefix_kv] if kind == "prefix" else [t for m in adapter.adaption.values() for t in (m.keys, m.values)]
    )
    assert on_device and all(t.device == accelerator for t in on_device)
