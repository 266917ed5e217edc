"""One behaviour suite for every store backend (disk and Redis), plus backend-specific failure modes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis

from adapters_store import (
    Change,
    InvalidTaskId,
    StoreUnavailable,
    TaskNotFound,
    VersionNotFound,
    disk,
    open_store,
)
from adapters_store.base import AdapterStore, content_sha256, redacted
from adapters_store.disk import DiskStore
from adapters_store.redis import RedisStore

log = logging.getLogger(__name__)
BACKBONE = "tiny-llama@sha256:0123"


def files(n: int = 0) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "n": n}).encode(),
        "adapter_model.safetensors": bytes([n % 256]) * (100 + n),
    }


def put(store: AdapterStore, task_id: str, n: int = 0, **kw):
    return store.put(task_id, files(n), kind="lora", parameters=100 + n, backbone=BACKBONE, **kw)


@pytest.fixture(params=["disk", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "disk":
        return f"file://{tmp_path / 'store'}"
    url = request.getfixturevalue("redis_url")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def store(store_url: str):
    with open_store(store_url) as s:
        yield s


# --- every operation ----------------------------------------------------------------------------


def test_put_then_get_round_trips_files_and_info(store: AdapterStore) -> None:
    before = time.time()
    info = put(store, "sentiment", 1, description="first")
    assert (info.task_id, info.version, info.kind, info.parameters) == ("sentiment", 1, "lora", 101)
    assert info.bytes == sum(len(d) for d in files(1).values())
    assert info.sha256 == content_sha256(files(1)) == content_sha256(dict(reversed(files(1).items())))
    assert before <= info.created_at <= time.time()
    assert (info.backbone, info.description) == (BACKBONE, "first")

    artifact = store.get("sentiment")
    assert artifact.info == info and dict(artifact.files) == files(1)
    assert store.get("sentiment", 1).info == info
    task = store.info("sentiment")
    assert (task.task_id, task.current, task.versions) == ("sentiment", 1, (info,))


def test_namespaced_task_ids_list_in_id_order_and_delete_alone(store: AdapterStore) -> None:
    for task_id in ("team-a/x", "team-a", "team-a.z", "team-b/x", "team-a/y"):
        put(store, task_id)
    assert [t.task_id for t in store.list().tasks] == ["team-a", "team-a.z", "team-a/x", "team-a/y", "team-b/x"]
    assert [t.task_id for t in store.list(after="team-a/", limit=2).tasks] == ["team-a/x", "team-a/y"]
    assert put(store, "team-a/x").version == 2 and store.info("team-a/x").current == 2
    store.delete("team-a/x")
    assert [t.task_id for t in store.list().tasks] == ["team-a", "team-a.z", "team-a/y", "team-b/x"]
    assert put(store, "team-a/x").version == 3  # numbers are never reused, namespaced or not
    for bad in ("Team-A/x", "a/b/c", "/x", "a/", "a//b", "a~b"):
        with pytest.raises(InvalidTaskId):
            put(store, bad)


def test_put_adds_a_version_and_never_changes_an_old_one(store: AdapterStore) -> None:
    v1 = put(store, "t", 1)
    v2 = put(store, "t", 2)
    assert (v1.version, v2.version) == (1, 2)
    assert store.get("t").info == v2 and dict(store.get("t").files) == files(2)
    old = store.get("t", 1)
    assert old.info == v1 and dict(old.files) == files(1)
    assert store.info("t").versions == (v1, v2) and store.info("t").current == 2


def test_set_current_rolls_back_and_forward(store: AdapterStore) -> None:
    v1, v2 = put(store, "t", 1), put(store, "t", 2)
    assert store.set_current("t", 1) == v1
    assert store.get("t").info == v1 and store.info("t").current == 1
    assert store.list().tasks[0].current == v1
    assert store.set_current("t", 2) == v2
    assert put(store, "t", 3).version == 3 and store.info("t").current == 3
    with pytest.raises(VersionNotFound):
        store.set_current("t", 9)
    with pytest.raises(VersionNotFound):
        store.set_current("t", 0)
    with pytest.raises(TaskNotFound):
        store.set_current("nope", 1)


def test_missing_tasks_and_versions_are_not_found(store: AdapterStore) -> None:
    put(store, "t")
    for call in (lambda: store.get("nope"), lambda: store.info("nope"), lambda: store.delete("nope")):
        with pytest.raises(TaskNotFound):
            call()
    with pytest.raises(TaskNotFound):
        store.get("nope", 1)
    with pytest.raises(VersionNotFound) as e:
        store.get("t", 2)
    assert isinstance(e.value, KeyError) and "version 2" in str(e.value)


@pytest.mark.parametrize("bad", ["", "-lead", "a/b/c", "A/b", "a:b", "../up", "x" * 129, "base", "sp ace", "é"])
def test_invalid_task_ids_are_refused_everywhere(store: AdapterStore, bad: str) -> None:
    calls = [
        lambda: put(store, bad),
        lambda: store.get(bad),
        lambda: store.info(bad),
        lambda: store.delete(bad),
        lambda: store.set_current(bad, 1),
    ]
    for call in calls:
        with pytest.raises(InvalidTaskId):
            call()
    assert store.list().tasks == ()


def test_put_refuses_unsafe_file_names(store: AdapterStore) -> None:
    for name in ("../x", "a/b", ".hidden", "meta.json", ""):
        with pytest.raises(ValueError, match="file name"):
            store.put("t", {name: b"x"}, kind="lora", parameters=0, backbone=BACKBONE)
    with pytest.raises(ValueError):
        store.put("t", {}, kind="lora", parameters=0, backbone=BACKBONE)
    with pytest.raises(TaskNotFound):
        store.info("t")


def test_delete_removes_every_version_and_numbers_are_never_reused(store: AdapterStore) -> None:
    put(store, "t", 1), put(store, "t", 2), put(store, "keep")
    store.delete("t")
    for call in (lambda: store.get("t"), lambda: store.get("t", 1), lambda: store.info("t")):
        with pytest.raises(TaskNotFound):
            call()
    assert [s.task_id for s in store.list().tasks] == ["keep"]
    # a cache keyed on (task, version) must never meet a different artifact under an old key
    assert put(store, "t", 3).version == 3
    assert store.info("t").versions[0].version == 3


def test_list_pages_in_task_id_order(store: AdapterStore) -> None:
    ids = [f"task-{i:02d}" for i in range(25)]
    for i in (7, 3, 24, 0, *range(25)):  # insertion order must not matter; repeats add versions
        put(store, ids[i], i)
    seen, after, pages = [], None, 0
    while True:
        page = store.list(after=after, limit=10)
        seen += [(s.task_id, s.current.version) for s in page.tasks]
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert [t for t, _ in seen] == ids and pages == 3
    assert dict(seen)["task-07"] == 2 and dict(seen)["task-05"] == 1
    assert [s.task_id for s in store.list(after="task-21").tasks] == ids[22:]
    assert store.list(after="task-24") == store.list(after="zzz")
    assert store.list(after="zzz").tasks == () and store.list(after="zzz").next_after is None
    assert [s.task_id for s in store.iter_tasks(page_size=7)] == ids
    for limit in (0, -1, 1001):
        with pytest.raises(ValueError):
            store.list(limit=limit)


def test_disk_listing_sees_tasks_another_replica_made_or_deleted(tmp_path: Path) -> None:
    """The disk store keeps its sorted task ids between pages; a change by any process must still show at once."""
    here, there = DiskStore(tmp_path, durable=False), DiskStore(tmp_path, durable=False)
    for task_id in ("b", "d"):
        put(there, task_id)
    old = time.time() - 60
    os.utime(tmp_path / "tasks", (old, old))  # long unchanged: the listing is kept
    assert [s.task_id for s in here.list().tasks] == ["b", "d"]
    assert [s.task_id for s in here.list().tasks] == ["b", "d"]  # from what it kept
    put(there, "a")
    there.delete("d")
    put(there, "c")
    assert [s.task_id for s in here.list().tasks] == ["a", "b", "c"]
    assert [s.task_id for s in here.list(after="a", limit=1).tasks] == ["b"]


def test_concurrent_puts_from_threads_get_distinct_versions(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    got: list[int] = []

    def worker(s: AdapterStore, w: int) -> None:
        barrier.wait()
        got.extend(put(s, "shared", w * 10 + i).version for i in range(6))

    threads = [threading.Thread(target=worker, args=(s, w)) for w, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 25))
    info = stores[0].info("shared")
    assert [v.version for v in info.versions] == list(range(1, 25))
    for v in info.versions:  # each version holds exactly the files its put wrote
        assert content_sha256(stores[0].get("shared", v.version).files) == v.sha256
    for s in stores:
        s.close()


def _put_from_process(root: str, worker: int, start, out) -> None:
    store = DiskStore(root)
    start.wait()
    out.put([put(store, "shared", worker * 100 + i).version for i in range(10)])


def test_concurrent_puts_from_processes_get_distinct_versions(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_put_from_process, args=(str(tmp_path), w, start, out)) for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert sorted(got[0] + got[1]) == list(range(1, 21))
    assert [v.version for v in DiskStore(tmp_path).info("shared").versions] == list(range(1, 21))


# --- crash mid-upload --------------------------------------------------------------------------------


def _crash_mid_upload(store_url: str) -> None:
    """Leave exactly what a writer killed half-way leaves behind."""
    if store_url.startswith("file://"):
        root = Path(store_url.removeprefix("file://"))
        staging = root / "tmp" / "put-crashed"
        staging.mkdir()
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        for vdir in (root / "tasks" / "t" / "v2", root / "tasks" / "ghost" / "v1"):  # renamed but no meta.json
            vdir.mkdir(parents=True)
            (vdir / "adapter_model.safetensors").write_bytes(b"half")
        return
    with redis.Redis.from_url(store_url) as client:
        for task, version in (("t", 2), ("ghost", 1)):
            client.incr(f"ts:task:{task}:next")
            client.hset(f"ts:task:{task}:v:{version}:files", "adapter_model.safetensors", b"half")
            client.set(f"ts:task:{task}:v:{version}:meta", json.dumps({"task_id": task}), ex=60)


def test_a_crash_mid_upload_leaves_readers_seeing_the_store_as_it_was(store: AdapterStore, store_url: str) -> None:
    v1 = put(store, "t", 1)
    before = (store.info("t"), store.get("t"), store.list())
    _crash_mid_upload(store_url)
    assert (store.info("t"), store.get("t"), store.list()) == before
    with pytest.raises(VersionNotFound):
        store.get("t", 2)
    with pytest.raises(VersionNotFound):
        store.set_current("t", 2)
    with pytest.raises(TaskNotFound):
        store.info("ghost")
    with pytest.raises(TaskNotFound):
        store.delete("ghost")
    assert [s.task_id for s in store.list().tasks] == ["t"]
    # and the store keeps working: the next put is complete and current
    v = put(store, "t", 3)
    assert v.version > 1 and store.get("t").info == v and store.get("t", 1).info == v1
    assert put(store, "ghost", 4).version >= 1 and store.info("ghost").current == store.get("ghost").info.version


def test_disk_debris_is_cleaned_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DiskStore(tmp_path)
    put(store, "t")
    _crash_mid_upload(f"file://{tmp_path}")
    assert put(store, "t", 1).version == 3  # v2 was debris: removed, its number skipped
    assert sorted(p.name for p in (tmp_path / "tasks" / "t").iterdir()) == ["CURRENT", "v1", "v3"]
    DiskStore(tmp_path)  # opening sweeps crashed uploads, but only stale ones: a fresh one may be a live writer's
    assert (tmp_path / "tmp" / "put-crashed").exists()
    monkeypatch.setattr("adapters_store.disk.STALE_UPLOAD_S", -1.0)
    DiskStore(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_killed_writers_staging_dir_is_removed_at_the_next_start(tmp_path: Path) -> None:
    """Staging dirs are named after their writer: a dead process's go at once, a live one's stay."""
    DiskStore(tmp_path)
    script = (
        "import os, sys, tempfile; from adapters_store import disk; "
        "d = tempfile.mkdtemp(prefix=disk._staging_prefix(), dir=sys.argv[1]); "
        "open(os.path.join(d, 'adapter_model.safetensors'), 'wb').write(b'half'); "
        "os.kill(os.getpid(), 9)"  # kill -9 mid-upload
    )
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tmp")], cwd=Path(__file__).parents[2])
    assert killed.returncode == -9
    [leftover] = (tmp_path / "tmp").iterdir()
    live = Path(tempfile.mkdtemp(prefix=disk._staging_prefix(), dir=tmp_path / "tmp"))  # this process: a writer
    foreign = tmp_path / "tmp" / "put-1-0123abcd-ffffffff-elsewhere"  # another host's: only the hour rule applies
    foreign.mkdir()
    DiskStore(tmp_path)
    assert not leftover.exists() and live.exists() and foreign.exists()


def test_store_urls_are_logged_without_their_password() -> None:
    assert redacted("redis://:S3cretPW@redis:6379/0") == "redis://***@redis:6379/0"
    assert redacted("rediss://user:pw@h/0?password=x&ssl=1") == "rediss://***@h/0?password=***&ssl=1"
    assert redacted("file://data/store") == "file://data/store"


def test_readers_never_see_a_torn_version(store: AdapterStore, store_url: str) -> None:
    put(store, "t", 0)
    done = threading.Event()

    def writer() -> None:
        with open_store(store_url) as w:
            for n in range(1, 16):
                put(w, "t", n)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not done.is_set() or reads == 0:
        artifact = store.get("t")
        assert content_sha256(artifact.files) == artifact.info.sha256
        assert dict(artifact.files) == files(artifact.info.parameters - 100)
        reads += 1
    thread.join()
    assert store.get("t").info.version == 16


# --- notifications ---------------------------------------------------------------------------------


def _next(changes: queue.Queue[Change]) -> Change:
    return changes.get(timeout=1.0)


def test_watch_delivers_changes_made_through_another_store_object(store_url: str) -> None:
    changes: queue.Queue[Change] = queue.Queue()
    with open_store(store_url) as watcher_store, open_store(store_url) as writer:
        watch = watcher_store.watch(changes.put)
        put(writer, "t", 1)
        assert _next(changes) == Change("t", "put", 1)
        put(writer, "t", 2)
        assert _next(changes) == Change("t", "put", 2)
        writer.set_current("t", 1)
        assert _next(changes) == Change("t", "current", 1)
        writer.delete("t")
        assert _next(changes) == Change("t", "delete", None)
        watch.close()
        put(writer, "t", 3)
        time.sleep(0.5)
        assert changes.empty()


def test_disk_watch_follows_a_rotated_change_log(tmp_path: Path) -> None:
    changes: queue.Queue[Change] = queue.Queue()
    resyncs = threading.Semaphore(0)
    writer = DiskStore(tmp_path, changes_max_bytes=150)  # rotates every couple of changes
    with DiskStore(tmp_path).watch(changes.put, on_resync=resyncs.release):
        for n in range(6):
            put(writer, f"t{n}")
            assert _next(changes) == Change(f"t{n}", "put", 1)
        assert resyncs.acquire(timeout=1)
    assert (tmp_path / "CHANGES").stat().st_size <= 150


def test_a_failing_callback_does_not_end_the_watch(store: AdapterStore, store_url: str) -> None:
    changes: queue.Queue[Change] = queue.Queue()

    def callback(change: Change) -> None:
        changes.put(change)
        raise RuntimeError("boom")

    store.watch(callback)
    with open_store(store_url) as writer:
        put(writer, "a"), put(writer, "b")
        assert [_next(changes).task_id, _next(changes).task_id] == ["a", "b"]


# --- scale -------------------------------------------------------------------------------------------


def _register_many(store_url: str, ids: list[str]) -> None:
    """Bulk setup; the store's own put is exercised elsewhere."""
    if store_url.startswith("file://"):
        fast = DiskStore(store_url.removeprefix("file://"), durable=False)
        for i, task_id in enumerate(ids):
            put(fast, task_id, i)
        return
    store = RedisStore(store_url)
    with store._client.pipeline(transaction=False) as pipe:
        for i, task_id in enumerate(ids):
            meta = {
                "task_id": task_id,
                "version": 1,
                "kind": "lora",
                "parameters": i,
                "bytes": 1,
                "sha256": content_sha256({"f": b"x"}),
                "created_at": 0.0,
                "backbone": BACKBONE,
                "description": None,
            }
            pipe.set(f"ts:task:{task_id}:next", 1)
            pipe.hset(f"ts:task:{task_id}:v:1:files", "f", b"x")
            pipe.set(f"ts:task:{task_id}:v:1:meta", json.dumps(meta))
            pipe.zadd(f"ts:task:{task_id}:versions", {1: 1})
            pipe.set(f"ts:task:{task_id}:current", 1)
            pipe.zadd("ts:tasks", {task_id: 0})
        pipe.execute()
    store.close()


@pytest.fixture
def big_store_url(store_url: str):
    """The disk variant lives on tmpfs when there is one: 10,000 task dirs on a busy disk are slow to make
    and to clean up, and this test is about listing, not about fsync."""
    if not store_url.startswith("file://"):
        yield store_url
        return
    root = tempfile.mkdtemp(prefix="taskserve-store-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    try:
        yield f"file://{root}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_ten_thousand_tasks_list_through_every_page_in_order(big_store_url: str) -> None:
    ids = [f"task-{i:05d}" for i in range(10_000)]
    _register_many(big_store_url, ids[::-1])
    with open_store(big_store_url) as store:
        t0 = time.perf_counter()
        seen = [s.task_id for s in store.iter_tasks(page_size=100)]
        elapsed = time.perf_counter() - t0
        assert seen == ids
        assert store.info(ids[0]).current == 1 and store.get(ids[-1]).info.task_id == ids[-1]
    log.info("listed 10,000 tasks in 100 pages in %.2fs (%s)", elapsed, big_store_url.split(":")[0])


# --- failure of the backend --------------------------------------------------------------------------


def test_redis_outage_fails_fast_and_recovers(redis_server) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
    store, watcher_store = RedisStore(redis_server.url), RedisStore(redis_server.url)
    changes: queue.Queue[Change] = queue.Queue()
    resynced = threading.Event()
    watcher_store.watch(changes.put, on_resync=resynced.set)
    put(store, "t")
    operations = {
        "ping": store.ping,
        "put": lambda: put(store, "t"),
        "get": lambda: store.get("t"),
        "get_version": lambda: store.get("t", 1),
        "info": lambda: store.info("t"),
        "list": lambda: store.list(),
        "set_current": lambda: store.set_current("t", 1),
        "delete": lambda: store.delete("t"),
    }
    redis_server.stop()
    late_changes: queue.Queue[Change] = queue.Queue()
    late_resynced = threading.Event()
    try:
        # a watcher started while Redis is down does not fail: it connects when Redis is back
        late_store = RedisStore(redis_server.url)
        late_store.watch(late_changes.put, on_resync=late_resynced.set)
        for name, operation in operations.items():
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                operation()
            assert time.monotonic() - t0 < 3.0, f"{name} did not fail fast"
        with pytest.raises(StoreUnavailable):
            RedisStore(redis_server.url).ping()
    finally:
        redis_server.start()
    # the restarted Redis is empty (no persistence in tests); every operation works again
    store.ping()
    assert put(store, "t").version == 1
    assert store.get("t").info.version == 1 and store.list().tasks[0].task_id == "t"
    assert resynced.wait(10) and late_resynced.wait(10), "a watcher did not (re-)subscribe"
    for q in (changes, late_changes):
        while not q.empty():
            q.get()
    put(store, "after")
    assert _next(changes) == Change("after", "put", 1) == _next(late_changes)
    for s in (store, watcher_store, late_store):
        s.close()


def test_redis_committed_versions_never_expire(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client, RedisStore(redis_url, staging_ttl_s=30) as store:
        client.flushdb()
        put(store, "t")
        assert client.ttl("ts:task:t:v:1:files") == client.ttl("ts:task:t:v:1:meta") == -1  # staged keys expire
        assert sorted(k.decode() for k in client.keys("ts:task:t:*")) == [
            "ts:task:t:current",
            "ts:task:t:next",
            "ts:task:t:v:1:files",
            "ts:task:t:v:1:meta",
            "ts:task:t:versions",
        ]
        store.delete("t")
        assert [k.decode() for k in client.keys("ts:*")] == ["ts:task:t:next"]  # kept: numbers are never reused


def test_disk_store_missing_root_is_unavailable(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")
    store.ping()
    (tmp_path / "store").rename(tmp_path / "gone")
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("file://relative/store") as s:
        assert isinstance(s, DiskStore) and s.root == tmp_path / "relative" / "store"
    with open_store(f"file://{tmp_path}/abs") as s:
        assert s.root == tmp_path / "abs"
    with open_store(redis_url) as s:
        assert isinstance(s, RedisStore)
        s.ping()
    for bad in ("s3://bucket", "/plain/path", "file://"):
        with pytest.raises(ValueError, match="file://"):
            open_store(bad)


# --- access records ------------------------------------------------------------------------------


def test_access_records_round_trip_and_are_shared_by_every_handle(store: AdapterStore, store_url: str) -> None:
    assert store.list_records("keys") == [] and store.get_record("keys", "ab12") is None
    store.put_record("keys", "ab12", {"tenant": "team-a", "scope": "inference"})
    store.put_record("keys", "0f00", {"tenant": "team-b", "scope": "admin"})
    store.put_record("tenants", "team-a", {"grants": ["shared"]})
    with open_store(store_url) as other:  # another replica
        assert other.get_record("keys", "ab12") == {"tenant": "team-a", "scope": "inference"}
        assert [r["tenant"] for r in other.list_records("keys")] == ["team-b", "team-a"]  # in id order
        assert other.delete_record("keys", "ab12") is True
    assert store.get_record("keys", "ab12") is None and store.delete_record("keys", "ab12") is False
    assert store.list_records("tenants") == [{"grants": ["shared"]}]
    for bad in ("", "../x", "AB", "a/b"):
        with pytest.raises(ValueError):
            store.put_record("keys", bad, {})
