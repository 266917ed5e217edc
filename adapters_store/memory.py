"""An in-process store: the engine's default when no store is configured, and for tests.

Same contract as the disk and Redis backends (immutable numbered versions, a current pointer,
version numbers never reused, change notifications), but nothing outlives the process and
nothing is shared with other processes.
"""

from __future__ import annotations

import heapq
import json
import queue
import threading
import time
from collections.abc import Callable, Mapping

from adapters_store.base import (
    AdapterStore,
    Artifact,
    Change,
    ChangeCallback,
    Page,
    TaskInfo,
    TaskNotFound,
    TaskSummary,
    VersionInfo,
    VersionNotFound,
    Watch,
    check_files,
    check_limit,
    check_record_id,
    check_version,
    content_sha256,
    validate_task_id,
)


class MemoryStore(AdapterStore):
    def __init__(self) -> None:
        self._versions: dict[str, dict[int, Artifact]] = {}
        self._current: dict[str, int] = {}
        self._next: dict[str, int] = {}  # survives delete: numbers are never reused
        self._watchers: list[_MemoryWatch] = []
        self._records: dict[str, dict[str, dict]] = {"keys": {}, "tenants": {}}
        self._lock = threading.Lock()

    def put_record(self, kind, record_id, document) -> None:
        check_record_id(record_id)
        with self._lock:
            self._records[kind][record_id] = json.loads(json.dumps(dict(document)))  # a copy, as a backend stores

    def get_record(self, kind, record_id) -> dict | None:
        with self._lock:
            found = self._records[kind].get(record_id)
        return None if found is None else dict(found)

    def list_records(self, kind) -> list[dict]:
        with self._lock:
            return [dict(self._records[kind][i]) for i in sorted(self._records[kind])]

    def delete_record(self, kind, record_id) -> bool:
        with self._lock:
            return self._records[kind].pop(record_id, None) is not None

    def put(self, task_id, files, *, kind, parameters, backbone, description=None) -> VersionInfo:
        validate_task_id(task_id)
        check_files(files)
        frozen = {name: bytes(data) for name, data in files.items()}
        with self._lock:
            version = self._next.get(task_id, 0) + 1
            self._next[task_id] = version
            info = VersionInfo(
                task_id=task_id,
                version=version,
                kind=kind,
                parameters=parameters,
                bytes=sum(len(d) for d in frozen.values()),
                sha256=content_sha256(frozen),
                created_at=time.time(),
                backbone=backbone,
                description=description,
            )
            self._versions.setdefault(task_id, {})[version] = Artifact(info=info, files=frozen)
            self._current[task_id] = version
        self._notify(Change(task_id, "put", version))
        return info

    def get(self, task_id: str, version: int | None = None) -> Artifact:
        with self._lock:
            versions = self._task(task_id)
            version = self._current[task_id] if version is None else check_version(task_id, version)
            if version not in versions:
                raise VersionNotFound(f"task {task_id!r} has no version {version}")
            return versions[version]

    def info(self, task_id: str) -> TaskInfo:
        with self._lock:
            versions = self._task(task_id)
            return TaskInfo(task_id, self._current[task_id], tuple(versions[v].info for v in sorted(versions)))

    def list(self, *, after: str | None = None, limit: int = 100) -> Page:
        check_limit(limit)
        with self._lock:
            ids = heapq.nsmallest(limit + 1, (t for t in self._versions if after is None or t > after))
            page = ids[:limit]
            tasks = tuple(TaskSummary(t, self._versions[t][self._current[t]].info) for t in page)
        return Page(tasks=tasks, next_after=page[-1] if len(ids) > limit else None)

    def delete(self, task_id: str) -> None:
        with self._lock:
            self._task(task_id)
            del self._versions[task_id], self._current[task_id]
        self._notify(Change(task_id, "delete", None))

    def set_current(self, task_id: str, version: int) -> VersionInfo:
        with self._lock:
            versions = self._task(task_id)
            if check_version(task_id, version) not in versions:
                raise VersionNotFound(f"task {task_id!r} has no version {version}")
            self._current[task_id] = version
            info = versions[version].info
        self._notify(Change(task_id, "current", version))
        return info

    def watch(self, callback: ChangeCallback, *, on_resync: Callable[[], None] | None = None) -> Watch:
        watcher = _MemoryWatch(callback, on_resync)
        with self._lock:
            self._watchers = [w for w in self._watchers if not w.closed] + [watcher]
        return watcher.start()

    def ping(self) -> None:
        pass

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.close()

    def _task(self, task_id: str) -> Mapping[int, Artifact]:
        versions = self._versions.get(task_id)
        if versions is None:
            raise TaskNotFound(f"unknown task {task_id!r}")
        return versions

    def _notify(self, change: Change) -> None:
        for watcher in list(self._watchers):
            watcher.changes.put(change)


class _MemoryWatch(Watch):
    def __init__(self, callback: ChangeCallback, on_resync: Callable[[], None] | None) -> None:
        super().__init__("taskserve-memory-watch", callback, on_resync)
        self.changes: queue.Queue[Change] = queue.Queue()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._deliver(self.changes.get(timeout=0.2))
            except queue.Empty:
                continue
