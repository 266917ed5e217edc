"""The task layer: upload, versions, rollback, delete and every task's current version, over the store.

It knows nothing of tensors. Whether an upload can be served at all is asked of the device cache it
is attached to (`Residency.validate`, on the CPU, before anything is stored), and that cache is told
when a version stops being current. Reads (a listing, a task, a version's files) need only the
store, so they answer while the model is still loading; an upload waits for the model (503).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from adapters_store import (
    AdapterKey,
    AdapterStore,
    Artifact,
    Change,
    Page,
    TaskInfo,
    TaskNotFound,
    TaskSummary,
    VersionInfo,
    VersionNotFound,
)
from adapters_store.base import BASE_TASK, MAX_PAGE, content_sha256, validate_task_id
from adapters_store.composite import inspect_composite
from adapters_store.format import (
    COMPOSITE_FILE,
    CONFIG_FILE,
    TEMPLATE_FILE,
    TEMPLATE_KIND,
    inspect_peft,
    parse_template,
)

log = logging.getLogger(__name__)


class ModelLoading(Exception):
    """Uploads are validated against the model, which is not loaded yet (HTTP 503)."""


class DeviceCache(Protocol):
    """What the task layer needs of the engine's residency."""

    @property
    def fingerprint(self) -> str: ...

    def validate(self, key: AdapterKey, files: Mapping[str, bytes], config: Mapping[str, Any] | None) -> int: ...

    def retire(self, task_id: str, keep: AdapterKey | None = None) -> None: ...

    def is_resident(self, key: AdapterKey) -> bool: ...


class TaskService:
    """Tasks and their versions over one store; `current_key` is what a request resolves its task id to.

    The current-version map is filled on first use and kept fresh by the store's change notifications,
    so a version uploaded on any replica is served by the next request everywhere.
    """

    def __init__(self, store: AdapterStore, cache: DeviceCache | None = None):
        self.store = store
        self._cache = cache
        self._current: dict[str, int] = {}  # task id -> current version
        self._lock = threading.Lock()
        self._watch = store.watch(self._on_change, on_resync=self._on_resync)

    def attach(self, cache: DeviceCache) -> None:
        """The model is loaded: uploads can be validated, and superseded versions leave its device."""
        self._cache = cache

    def close(self) -> None:
        self._watch.close()

    # --- reads ------------------------------------------------------------------------------------

    def current_key(self, task_id: str) -> AdapterKey | None:
        """The version a request for `task_id` runs on; None for the bare backbone."""
        if task_id == BASE_TASK:
            return None
        with self._lock:
            version = self._current.get(task_id)
        if version is None:
            try:
                version = self.store.info(task_id).current
            except TaskNotFound:
                raise TaskNotFound(f"unknown task {task_id!r}") from None
            with self._lock:
                version = self._current.setdefault(task_id, version)
        return AdapterKey(task_id, version)

    def key(self, task_id: str, version: int | None = None) -> AdapterKey | None:
        """The version a request runs on: the current one, or the stored `version` it names (to compare
        versions side by side, or to keep serving one while a newer is tried)."""
        if version is None:
            return self.current_key(task_id)
        if task_id == BASE_TASK:
            raise VersionNotFound("'base' is the backbone alone: it has no versions")
        info = self.store.info(task_id)
        if all(v.version != version for v in info.versions):
            kept = ", ".join(str(v.version) for v in info.versions)
            raise VersionNotFound(f"task {task_id!r} has no version {version} (it keeps {kept})")
        return AdapterKey(task_id, version)

    def info(self, task_id: str) -> TaskInfo:
        return self.store.info(task_id)

    def page(self, *, after: str | None = None, limit: int = 100) -> Page:
        return self.store.list(after=after, limit=limit)

    def page_within(
        self, namespace: str, grants: Iterable[str] = (), *, after: str | None = None, limit: int = 100
    ) -> Page:
        """A page of a tenant's view: the tasks in `namespace` and the granted ones, in id order."""
        prefix, after = namespace + "/", after or ""
        found: list[TaskSummary] = []
        cursor: str | None = max(after, prefix)
        while cursor is not None and len(found) <= limit:  # the namespace is one contiguous range of ids
            page = self.store.list(after=cursor, limit=min(MAX_PAGE, limit + 1))
            inside = [t for t in page.tasks if t.task_id.startswith(prefix)]
            found += inside
            cursor = page.next_after if len(inside) == len(page.tasks) else None
        for task_id in sorted(g for g in set(grants) if g > after and not g.startswith(prefix)):
            try:
                found.append(TaskSummary(task_id, self.store.info(task_id).current_info))
            except TaskNotFound:
                continue  # a grant outlives the task it names
        found.sort(key=lambda t: t.task_id)
        return Page(tuple(found[:limit]), found[limit - 1].task_id if len(found) > limit else None)

    def iter_tasks(self) -> Iterator[TaskSummary]:
        return self.store.iter_tasks()

    def files(self, key: AdapterKey) -> Artifact:
        return self.store.get(key.task_id, key.version)

    def is_resident(self, key: AdapterKey) -> bool:
        """Whether the version is on this replica's device (never, while the model loads)."""
        cache = self._cache
        return cache is not None and cache.is_resident(key)

    # --- writes -----------------------------------------------------------------------------------

    def upload(
        self, task_id: str, files: Mapping[str, bytes], description: str | None = None
    ) -> tuple[VersionInfo, bool]:
        """Check, validate against the model, then store as the new current version (all or nothing).

        Returns (the version, whether it is new): an upload identical to the current version (same files,
        same backbone, no other description) stores nothing and returns that version. Nothing of it stays
        in memory but its current-version entry: its first request loads it from the store (registering
        thousands of tasks must not push the warm ones' files out of the host tier).
        """
        validate_task_id(task_id)
        cache = self._cache
        if cache is None:
            raise ModelLoading("the model is still loading; uploads are checked against it, retry shortly")
        if (current := self._identical_current(task_id, files, description, cache.fingerprint)) is not None:
            return current, False
        if COMPOSITE_FILE in files:
            _, summary = inspect_composite(files)  # each component checked like a single upload
            kind, parameters, config = summary.kind, summary.parameters, None
        elif CONFIG_FILE in files:
            summary = inspect_peft(files)  # the config is parsed here, once
            kind, parameters, config = summary.kind, summary.parameters, summary.config
        else:
            parse_template(files[TEMPLATE_FILE])
            kind, parameters, config = TEMPLATE_KIND, 0, None
        cache.validate(AdapterKey(task_id, 0), files, config)  # version 0: not stored yet
        info = self.store.put(
            task_id, files, kind=kind, parameters=parameters, backbone=cache.fingerprint, description=description
        )
        self._set_current(info.key)
        return info, True

    def identical_current(self, task_id: str, files: Mapping[str, bytes]) -> VersionInfo | None:
        """The task's current version if it holds exactly `files` for this model, else None."""
        cache = self._cache
        return None if cache is None else self._identical_current(task_id, files, None, cache.fingerprint)

    def _identical_current(
        self, task_id: str, files: Mapping[str, bytes], description: str | None, fingerprint: str
    ) -> VersionInfo | None:
        try:
            current = self.store.info(task_id).current_info
        except TaskNotFound:
            return None
        same = current.sha256 == content_sha256(files) and current.backbone == fingerprint
        return current if same and description in (None, current.description) else None

    def rollback(self, task_id: str, version: int) -> VersionInfo:
        """Make an earlier (or later) version current again."""
        info = self.store.set_current(task_id, version)
        self._set_current(info.key)
        return info

    def delete(self, task_id: str) -> None:
        """The task and all its versions; rows already running on it finish first."""
        self.store.delete(task_id)
        self._on_change(Change(task_id=task_id, kind="delete", version=None))

    # --- changes from any replica -----------------------------------------------------------------

    def _set_current(self, key: AdapterKey) -> None:
        with self._lock:
            self._current[key.task_id] = key.version
        if self._cache is not None:
            self._cache.retire(key.task_id, keep=key)

    def _on_change(self, change: Change) -> None:
        if change.kind == "delete" or change.version is None:
            with self._lock:
                self._current.pop(change.task_id, None)
            if self._cache is not None:
                self._cache.retire(change.task_id)
        else:
            self._set_current(AdapterKey(change.task_id, change.version))

    def _on_resync(self) -> None:
        with self._lock:
            self._current.clear()  # re-read from the store on the next request
