"""Which task versions live on the device: bounded by bytes, least recently used first out.

Three tiers: the device (materialised `LoadedAdapter`s), host RAM (the version's raw files, so a
reload after eviction skips the store), and the store. A request takes a `Lease` on one
`AdapterKey`: the lease pins that version on the device until the request ends, so eviction
never pulls weights from under a running row. Loads run on a background thread, one per
version however many requests ask (deduplicated), and the engine loop never waits for one.

Which version is current, uploads, rollbacks and deletes belong to the task layer
(`server/tasks.py`); it tells this cache when a version stops being current (`retire`) and asks it
whether an upload can be served at all (`validate`, on the CPU, before anything is stored).

A load's bytes are reserved under the lock before its tensors reach the device, so loads in flight
count against the budget like resident versions: two loads never both fit where only one does.
Byte totals and the resident count are kept as running sums, so making room is one pass over the LRU
order and nothing here costs more with more versions resident.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from adapters_store import AdapterKey, AdapterStore
from adapters_store.format import COMPOSITE_FILE, CONFIG_FILE, TEMPLATE_FILE, WEIGHTS_FILE
from adapters_store.memory import MemoryStore
from server.engine.adapters import AdapterError, LoadedAdapter, Placement, load_adapter, load_peft_files
from server.engine.adapters.composite import load_composite
from server.engine.adapters.pool import AdapterPool
from server.engine.adapters.template import load_template, with_prompt_format
from server.engine.backbone import Backbone
from server.engine.request import EngineError

log = logging.getLogger(__name__)


class ResidencyFull(EngineError):
    """Running rows pin more adapter bytes than the device budget allows (HTTP 503)."""


class AdapterTooLarge(AdapterError):
    """A version that could never fit the device adapter budget (HTTP 422: no retry will help)."""


@dataclass(eq=False)
class _Entry:
    """One task version on the device, or on its way there."""

    key: AdapterKey
    loaded: Future  # -> LoadedAdapter
    nbytes: int = 0  # reserved once the load has made room; counted in Residency._device_bytes
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
        # validation stays off the device
        self._on_cpu = Placement(torch.device("cpu"), backbone.dtype, base_linear=backbone.linear_weights)
        self.pool = AdapterPool(backbone.geometry, backbone.device)  # where resident LoRA and IA³ weights live
        self.store = store if store is not None else MemoryStore()  # read here: a version's files, by key
        self.device_budget, self.host_budget = device_bytes, host_bytes
        self._device: OrderedDict[AdapterKey, _Entry] = OrderedDict()  # LRU order: least recent first
        self._host: OrderedDict[AdapterKey, Mapping[str, bytes]] = OrderedDict()
        self._device_bytes = 0  # reserved by entries in `_device`, loads in flight included
        self._reserved = 0  # entries in `_device` holding a reservation (kept as a count: never a scan)
        self._host_bytes = 0
        self._by_task: dict[str, set[AdapterKey]] = {}  # keys held in either tier, for `retire`
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="taskserve-load")
        self.stats = ResidencyStats()

    @property
    def fingerprint(self) -> str:
        """The backbone that validated versions are valid for."""
        return self._backbone.geometry.fingerprint

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # --- requests -------------------------------------------------------------------------------

    def acquire(self, key: AdapterKey | None, timeout: float | None = None) -> Lease:
        """Pin `key` on the device, loading it if needed (blocks the caller only); None is the base model."""
        if key is None:
            return Lease(None)
        entry = self._pin(key)
        try:
            adapter = entry.loaded.result(timeout=timeout)
        except BaseException:
            self._unpin(entry)
            raise
        return Lease(adapter, _release=lambda: self._unpin(entry))

    async def acquire_async(self, key: AdapterKey | None) -> Lease:
        """`acquire` for asyncio: the load runs off the event loop; a cancelled wait leaves no pin."""
        if key is None:
            return Lease(None)
        entry = self._pin(key)
        try:
            adapter = await asyncio.shield(asyncio.wrap_future(entry.loaded))  # the load is shared: never cancel it
        except BaseException:
            self._unpin(entry)
            raise
        return Lease(adapter, _release=lambda: self._unpin(entry))

    def get(self, key: AdapterKey | None) -> LoadedAdapter | None:
        """The version as served, loaded if needed (tests and tools); None for the base model."""
        lease = self.acquire(key)
        lease.release()
        return lease.adapter

    def is_resident(self, key: AdapterKey) -> bool:
        with self._lock:
            entry = self._device.get(key)
            return entry is not None and entry.loaded.done() and not entry.loaded.exception()

    def _pin(self, key: AdapterKey) -> _Entry:
        with self._lock:
            entry = self._device.get(key)
            if entry is None:
                entry = _Entry(key=key, loaded=Future())
                self._device[key] = entry
                self._by_task.setdefault(key.task_id, set()).add(key)
                self._loader.submit(self._load, entry)
            self._device.move_to_end(key)
            entry.pins += 1
        return entry

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0 and entry.stale and entry.loaded.done():
                self._drop(entry)

    # --- loading and eviction -------------------------------------------------------------------

    def _load(self, entry: _Entry) -> None:
        try:
            files = self._host_files(entry.key)
            staged = self._materialise(entry.key, files, self._on_cpu)  # nothing reaches the device unreserved
            with self._lock:
                self._make_room(entry, adapter_bytes(staged, self._backbone))
            adapter = self.pool.install(self._to_device(entry.key, files, staged))
        except BaseException as exc:
            with self._lock:
                self.stats.failures += 1
                self._drop(entry)
            entry.loaded.set_exception(exc)
            return
        with self._lock:
            self.stats.loads += 1
            entry.loaded.set_result(adapter)
            if entry.stale and entry.pins == 0:  # retired while it loaded, and nobody waits for it
                self._drop(entry)

    def _host_files(self, key: AdapterKey) -> Mapping[str, bytes]:
        with self._lock:
            files = self._host.get(key)
            if files is not None:
                self._host.move_to_end(key)
                return files
        files = self.store.get(key.task_id, key.version).files
        self.keep(key, files)
        log.debug("fetched %s from the store (%d bytes)", key, sum(len(d) for d in files.values()))
        return files

    def _materialise(
        self, key: AdapterKey, files: Mapping[str, bytes], placement: Placement, config: Mapping[str, Any] | None = None
    ) -> LoadedAdapter:
        if COMPOSITE_FILE in files:
            adapter = load_composite(key, files, self._backbone.geometry, placement)
        elif CONFIG_FILE not in files:
            return load_template(key, files[TEMPLATE_FILE], self._backbone.tokenizer)
        else:
            parsed, tensors = load_peft_files(files[CONFIG_FILE], files[WEIGHTS_FILE], config=config)
            adapter = load_adapter(key, parsed, tensors, self._backbone.geometry, placement)
        if TEMPLATE_FILE in files:  # the text the adapter was trained to see around each input
            adapter = with_prompt_format(adapter, files[TEMPLATE_FILE])
        return adapter

    def _to_device(self, key: AdapterKey, files: Mapping[str, bytes], staged: LoadedAdapter) -> LoadedAdapter:
        """A version staged on the host, its bytes reserved, with its prefill tensors moved to the device (the pool
        takes the per-layer weights). LLaMA-Adapter's prompt is projected again there, with the backbone's own
        k_proj / v_proj on the device, as PEFT computes it."""
        if staged.adaption:
            return self._materialise(key, files, self._placement)
        device = self._placement.device
        return replace(
            staged,
            soft_prompt=None if staged.soft_prompt is None else staged.soft_prompt.to(device),
            prefix_kv=None if staged.prefix_kv is None else staged.prefix_kv.to(device),
        )

    def _make_room(self, incoming: _Entry, nbytes: int) -> None:
        """Evict unpinned loaded versions, least recently used first, then reserve `nbytes` (lock held).

        One pass: the victims are chosen before any is dropped, so a load that cannot fit evicts nothing.
        """
        if nbytes > self.device_budget:
            raise AdapterTooLarge(_too_large(str(incoming.key), nbytes, self.device_budget))
        excess = self._device_bytes + nbytes - self.device_budget
        victims: list[_Entry] = []
        for entry in self._device.values():
            if excess <= 0:
                break
            if entry is not incoming and entry.pins == 0 and entry.loaded.done():
                victims.append(entry)
                excess -= entry.nbytes
        if excess > 0:
            raise ResidencyFull("running requests pin the whole device adapter budget; retry shortly")
        for entry in victims:
            self._drop(entry)
            self.stats.evictions += 1
        incoming.nbytes = nbytes
        self._device_bytes += nbytes
        self._reserved += 1
        self._update_stats()

    def _drop(self, entry: _Entry) -> None:
        """Take `entry` off the device: its bytes and pool slots come back (lock held)."""
        if self._device.get(entry.key) is not entry:
            return
        del self._device[entry.key]  # the tensors go with the last reference (running rows hold none)
        self._device_bytes -= entry.nbytes
        self._reserved -= entry.nbytes > 0
        if entry.loaded.done() and entry.loaded.exception() is None:
            self.pool.release(entry.loaded.result())
        self._forget_if_gone(entry.key)
        self._update_stats()

    def _update_stats(self) -> None:
        self.stats.device_bytes = self._device_bytes
        self.stats.host_bytes = self._host_bytes
        self.stats.resident = self._reserved

    # --- the task layer's side --------------------------------------------------------------------

    def validate(self, key: AdapterKey, files: Mapping[str, bytes], config: Mapping[str, Any] | None = None) -> int:
        """Refuse what would be served wrong or could never fit the device; returns the device bytes it needs.

        Runs on the CPU, so a refused upload never allocates device memory.
        """
        nbytes = adapter_bytes(self._materialise(key, files, self._on_cpu, config), self._backbone)
        if nbytes > self.device_budget:
            raise AdapterTooLarge(_too_large(f"task {key.task_id!r}", nbytes, self.device_budget))
        return nbytes

    def keep(self, key: AdapterKey, files: Mapping[str, bytes]) -> None:
        """Cache a version's files in host RAM within the host budget, least recently used out."""
        size = sum(len(d) for d in files.values())
        with self._lock:
            if key in self._host or size > self.host_budget:
                return
            self._host[key] = files
            self._host_bytes += size
            self._by_task.setdefault(key.task_id, set()).add(key)
            while self._host_bytes > self.host_budget:
                old, old_files = self._host.popitem(last=False)
                self._host_bytes -= sum(len(d) for d in old_files.values())
                self._forget_if_gone(old)
            self._update_stats()

    def retire(self, task_id: str, keep: AdapterKey | None = None) -> None:
        """Versions of `task_id` other than `keep` leave once no running row pins them (a new current, a delete)."""
        with self._lock:
            for key in list(self._by_task.get(task_id, ())):
                if key == keep:
                    continue
                if (files := self._host.pop(key, None)) is not None:
                    self._host_bytes -= sum(len(d) for d in files.values())
                entry = self._device.get(key)
                if entry is not None:
                    entry.stale = True
                    if entry.pins == 0 and entry.loaded.done():
                        self._drop(entry)
                self._forget_if_gone(key)
            self._update_stats()

    def _forget_if_gone(self, key: AdapterKey) -> None:
        if key not in self._device and key not in self._host:
            keys = self._by_task.get(key.task_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_task[key.task_id]


def _too_large(what: str, nbytes: int, budget: int) -> str:
    return (
        f"{what} needs {nbytes} bytes on the device, more than the whole device adapter budget of {budget} bytes "
        "(TASKSERVE_DEVICE_ADAPTER_BYTES); it could never be served"
    )


def adapter_bytes(adapter: LoadedAdapter, backbone: Backbone) -> int:
    """Device bytes the adapter occupies, counting a template's KV before it is computed."""
    nbytes = adapter.nbytes
    if adapter.needs_template_kv:
        g = backbone.geometry
        nbytes += len(adapter.template_ids) * g.num_layers * 2 * g.kv_dim * backbone.dtype.itemsize
    return nbytes
