"""Which task versions live on the device: bounded by bytes, least recently used first out.

Three tiers: the device (materialised `LoadedAdapter`s), host RAM (the version's raw files, so a
reload after eviction skips the store), and the store. A request takes a `Lease` on its task's
current version: the lease pins that version on the device until the request ends, so eviction
never pulls weights from under a running row. Loads run on a background thread, one per
version however many requests ask (deduplicated), and the engine loop never waits for one.
The cache key is task@version: versions never mix, and a new upload is picked up by the next
request (the store's change notifications keep the task -> current version map fresh).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from adapters_store import AdapterStore, Change, TaskNotFound, VersionInfo
from adapters_store.format import (
    CONFIG_FILE,
    TEMPLATE_FILE,
    WEIGHTS_FILE,
    FormatError,
    UploadTooLarge,
    inspect_peft,
    parse_template,
    validate_task_id,
)
from adapters_store.memory import MemoryStore
from server.engine.adapters import AdapterError, LoadedAdapter, Placement, load_adapter, load_peft_files
from server.engine.adapters.pool import AdapterPool
from server.engine.adapters.template import load_template, with_prompt_format
from server.engine.backbone import Backbone
from server.engine.request import BASE_TASK, EngineError, UnknownTask

log = logging.getLogger(__name__)


class ResidencyFull(EngineError):
    """Running rows pin more adapter bytes than the device budget allows (HTTP 503)."""


@dataclass
class _Entry:
    """One task version on the device, or on its way there."""

    key: str
    loaded: Future  # -> LoadedAdapter
    nbytes: int = 0
    pins: int = 0  # leases held by requests
    stale: bool = False  # deleted or superseded: drop as soon as nobody pins it


@dataclass
class ResidencyStats:
    loads: int = 0
    evictions: int = 0
    failures: int = 0
    device_bytes: int = 0
    host_bytes: int = 0
    resident: int = 0


@dataclass(eq=False)
class Lease:
    """A request's hold on one task version; `release` exactly once when the request ends."""

    adapter: LoadedAdapter | None  # None: the base model
    _release: object = field(default=None, repr=False)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Residency:
    def __init__(
        self,
        backbone: Backbone,
        store: AdapterStore | None = None,
        *,
        device_bytes: int = 1 << 30,
        host_bytes: int = 4 << 30,
    ):
        self._backbone = backbone
        self._placement = Placement(backbone.device, backbone.dtype, base_linear=backbone.linear_weights)
        self.pool = AdapterPool(backbone.geometry, backbone.device)  # where resident LoRA and IA³ weights live
        self.store = store if store is not None else MemoryStore()  # in-process tasks when no store is configured
        self.device_budget, self.host_budget = device_bytes, host_bytes
        self._current: dict[str, int] = {}  # task id -> current version, kept fresh by the store's notifications
        self._device: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: least recent first
        self._host: OrderedDict[str, Mapping[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="taskserve-load")
        self.stats = ResidencyStats()
        self._watch = self.store.watch(self._on_change, on_resync=self._on_resync)

    def close(self) -> None:
        self._watch.close()
        self._loader.shutdown(wait=False, cancel_futures=True)

    # --- requests -------------------------------------------------------------------------------

    def acquire(self, task_id: str, timeout: float | None = None) -> Lease:
        """Pin the task's current version on the device, loading it if needed (blocks the caller only)."""
        future, entry = self._pin(task_id)
        if future is None:
            return Lease(None)
        try:
            adapter = future.result(timeout=timeout)
        except BaseException:
            self._unpin(entry)
            raise
        return Lease(adapter, _release=lambda: self._unpin(entry))

    async def acquire_async(self, task_id: str) -> Lease:
        """`acquire` for asyncio: the store lookup and the load run off the event loop."""
        pinning = asyncio.ensure_future(asyncio.to_thread(self._pin, task_id))
        try:
            future, entry = await asyncio.shield(pinning)
        except asyncio.CancelledError:  # the pin still lands in its thread: undo it there
            pinning.add_done_callback(self._unpin_when_pinned)
            raise
        if future is None:
            return Lease(None)
        try:
            adapter = await asyncio.wrap_future(future)
        except BaseException:
            self._unpin(entry)
            raise
        return Lease(adapter, _release=lambda: self._unpin(entry))

    def _pin(self, task_id: str) -> tuple[Future | None, _Entry | None]:
        if task_id == BASE_TASK:
            return None, None
        version = self._current_version(task_id)
        key = f"{task_id}@{version}"
        with self._lock:
            entry = self._device.get(key)
            if entry is None:
                entry = _Entry(key=key, loaded=Future())
                self._device[key] = entry
                self._loader.submit(self._load, entry, task_id, version)
            self._device.move_to_end(key)
            entry.pins += 1
        return entry.loaded, entry

    def _unpin_when_pinned(self, pinning: asyncio.Future) -> None:
        if not pinning.cancelled() and pinning.exception() is None and pinning.result()[1] is not None:
            self._unpin(pinning.result()[1])

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0 and entry.stale:
                self._drop(entry)

    def _current_version(self, task_id: str) -> int:
        with self._lock:
            version = self._current.get(task_id)
        if version is None:
            try:
                version = self.store.info(task_id).current
            except TaskNotFound:
                raise UnknownTask(f"unknown task {task_id!r}") from None
            with self._lock:
                self._current.setdefault(task_id, version)
        return version

    # --- loading and eviction -------------------------------------------------------------------

    def _load(self, entry: _Entry, task_id: str, version: int) -> None:
        try:
            files = self._host_files(entry.key, task_id, version)
            adapter = self._materialise(entry.key, files)
            with self._lock:
                entry.nbytes = adapter_bytes(adapter, self._backbone)
                self._make_room(entry)
                self.stats.loads += 1
                self._update_stats()
            adapter = self.pool.install(adapter)
        except BaseException as exc:
            with self._lock:
                self.stats.failures += 1
                if self._device.get(entry.key) is entry:
                    del self._device[entry.key]
                self._update_stats()
            entry.loaded.set_exception(exc)
            return
        entry.loaded.set_result(adapter)

    def _host_files(self, key: str, task_id: str, version: int) -> Mapping[str, bytes]:
        with self._lock:
            files = self._host.get(key)
            if files is not None:
                self._host.move_to_end(key)
                return files
        files = self.store.get(task_id, version).files
        with self._lock:
            self._keep_on_host(key, files)
        log.debug("fetched %s from the store (%d bytes)", key, sum(len(d) for d in files.values()))
        return files

    def _keep_on_host(self, key: str, files: Mapping[str, bytes]) -> None:
        """Cache a version's files in host RAM within the host budget, least recently used out (lock held)."""
        self._host[key] = files
        while sum(len(d) for f in self._host.values() for d in f.values()) > self.host_budget and self._host:
            self._host.popitem(last=False)
        self.stats.host_bytes = sum(len(d) for f in self._host.values() for d in f.values())

    def _materialise(self, key: str, files: Mapping[str, bytes]) -> LoadedAdapter:
        if CONFIG_FILE not in files:
            return load_template(key, files[TEMPLATE_FILE], self._backbone.tokenizer)
        config, tensors = load_peft_files(files[CONFIG_FILE], files[WEIGHTS_FILE])
        adapter = load_adapter(key, config, tensors, self._backbone.geometry, self._placement)
        if TEMPLATE_FILE in files:  # the text the adapter was trained to see around each input
            adapter = with_prompt_format(adapter, files[TEMPLATE_FILE])
        return adapter

    def _make_room(self, incoming: _Entry) -> None:
        """Evict unpinned versions, least recently used first, until `incoming` fits (lock held)."""
        if incoming.nbytes > self.device_budget:
            raise ResidencyFull(
                f"{incoming.key} needs {incoming.nbytes} bytes, over the device adapter budget of {self.device_budget}"
            )
        for key in list(self._device):
            if self._resident_bytes(besides=incoming) + incoming.nbytes <= self.device_budget:
                break
            entry = self._device[key]
            if entry is not incoming and entry.pins == 0 and entry.loaded.done():
                self._drop(entry)
                self.stats.evictions += 1
        if self._resident_bytes(besides=incoming) + incoming.nbytes > self.device_budget:
            raise ResidencyFull("running requests pin the whole device adapter budget; retry shortly")

    def _resident_bytes(self, besides: _Entry | None = None) -> int:
        """Bytes of the versions on the device or on their way (a load counts once it has made room)."""
        return sum(e.nbytes for e in self._device.values() if e is not besides)

    def _drop(self, entry: _Entry) -> None:
        if self._device.get(entry.key) is entry:
            del self._device[entry.key]  # the tensors go with the last reference (running rows hold none)
            if entry.loaded.done() and entry.loaded.exception() is None:
                self.pool.release(entry.loaded.result())
        self._update_stats()

    def _update_stats(self) -> None:
        self.stats.device_bytes = self._resident_bytes()
        self.stats.resident = sum(1 for e in self._device.values() if e.nbytes)

    # --- uploads and changes --------------------------------------------------------------------

    def upload(self, task_id: str, files: Mapping[str, bytes], description: str | None = None) -> VersionInfo:
        """Validate against the backbone, then store as the task's new current version (all or nothing)."""
        validate_task_id(task_id)
        try:
            if CONFIG_FILE not in files:
                parse_template(files[TEMPLATE_FILE])
                kind, parameters = "template", 0
            else:
                summary = inspect_peft(files)
                kind, parameters = summary.kind, summary.parameters
        except UploadTooLarge:
            raise
        except FormatError as exc:
            raise AdapterError(str(exc)) from None
        adapter = self._materialise(f"{task_id}@new", files)  # refuses what would be served wrong
        info = self.store.put(
            task_id,
            files,
            kind=kind,
            parameters=parameters,
            backbone=self._backbone.geometry.fingerprint,
            description=description,
        )
        key = f"{task_id}@{info.version}"
        entry = _Entry(key=key, loaded=Future())
        with self._lock:
            entry.nbytes = adapter_bytes(adapter, self._backbone)
            if entry.nbytes <= self.device_budget:
                try:
                    self._make_room(entry)
                    entry.loaded.set_result(self.pool.install(replace(adapter, key=key)))
                    self._device[key] = entry  # warm on this replica
                except ResidencyFull:
                    pass
            self._keep_on_host(key, dict(files))
            self._set_current(task_id, info.version)
            self._update_stats()
        return info

    def register(self, task_id: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> LoadedAdapter:
        """In-process upload of an already-parsed PEFT adapter (tests, tools); returns what is served."""
        files = {
            CONFIG_FILE: json.dumps(dict(config)).encode(),
            WEIGHTS_FILE: save_safetensors({k: v.contiguous() for k, v in tensors.items()}),
        }
        self.upload(task_id, files)
        return self.get(task_id)

    def get(self, task_id: str) -> LoadedAdapter | None:
        """The task's current adapter, loaded if needed; None for the base model."""
        lease = self.acquire(task_id)
        lease.release()
        return lease.adapter

    def task_ids(self) -> list[str]:
        return [summary.task_id for summary in self.store.iter_tasks()]

    def delete(self, task_id: str) -> None:
        self.store.delete(task_id)
        self._on_change(Change(task_id=task_id, kind="delete", version=None))

    def rollback(self, task_id: str, version: int) -> VersionInfo:
        info = self.store.set_current(task_id, version)
        self._on_change(Change(task_id=task_id, kind="current", version=version))
        return info

    def is_resident(self, task_id: str, version: int) -> bool:
        with self._lock:
            entry = self._device.get(f"{task_id}@{version}")
            return entry is not None and entry.loaded.done() and not entry.loaded.exception()

    def _on_change(self, change: Change) -> None:
        with self._lock:
            if change.kind == "delete" or change.version is None:
                self._current.pop(change.task_id, None)
                self._retire(change.task_id, keep=None)
            else:
                self._set_current(change.task_id, change.version)

    def _on_resync(self) -> None:
        with self._lock:
            self._current.clear()  # re-read from the store on the next request

    def _set_current(self, task_id: str, version: int) -> None:
        self._current[task_id] = version
        self._retire(task_id, keep=f"{task_id}@{version}")

    def _retire(self, task_id: str, keep: str | None) -> None:
        """Old versions of a task leave once no running row pins them (lock held)."""
        for key, entry in list(self._device.items()):
            if key.rsplit("@", 1)[0] == task_id and key != keep:
                entry.stale = True
                if entry.pins == 0 and entry.loaded.done():
                    self._drop(entry)
        for key in [k for k in self._host if k.rsplit("@", 1)[0] == task_id and k != keep]:
            del self._host[key]


def adapter_bytes(adapter: LoadedAdapter, backbone: Backbone) -> int:
    """Device bytes the adapter occupies, counting a template's KV before it is computed."""
    nbytes = adapter.nbytes
    if adapter.needs_template_kv:
        g = backbone.geometry
        nbytes += len(adapter.template_ids) * g.num_layers * 2 * g.kv_dim * backbone.dtype.itemsize
    return nbytes
