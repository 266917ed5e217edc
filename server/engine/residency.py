"""Which task parameters live on the device.

Today: every registered task stays resident until removed, and the tensors are
counted. The byte budget, LRU eviction and background loads from the store
come with the adapter store (issue 3); the engine only ever calls `get`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

import torch

from server.engine.adapters import LoadedAdapter, Placement, load_adapter
from server.engine.backbone import Backbone
from server.engine.request import BASE_TASK, InvalidRequest, UnknownTask

TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Residency:
    def __init__(self, backbone: Backbone):
        self._backbone = backbone
        self._placement = Placement(device=backbone.device, dtype=backbone.dtype)
        self._tasks: dict[str, LoadedAdapter] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def register(self, task_id: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> LoadedAdapter:
        """Load and check a PEFT adapter, then make it the task's current version (all or nothing)."""
        if task_id == BASE_TASK:
            raise InvalidRequest(f"task id {BASE_TASK!r} is reserved for the backbone alone")
        if not TASK_ID.fullmatch(task_id):
            raise InvalidRequest(f"task id {task_id!r} must match {TASK_ID.pattern}")
        with self._lock:
            version = self._versions.get(task_id, 0) + 1
        adapter = load_adapter(f"{task_id}@{version}", config, tensors, self._backbone.geometry, self._placement)
        with self._lock:
            self._versions[task_id] = version
            self._tasks[task_id] = adapter  # running rows keep their reference to the old version
        return adapter

    def remove(self, task_id: str) -> None:
        with self._lock:
            if self._tasks.pop(task_id, None) is None:
                raise UnknownTask(f"unknown task {task_id!r}")

    def get(self, task_id: str) -> LoadedAdapter | None:
        """The task's current adapter; None for the base model."""
        if task_id == BASE_TASK:
            return None
        with self._lock:
            adapter = self._tasks.get(task_id)
        if adapter is None:
            raise UnknownTask(f"unknown task {task_id!r}")
        return adapter

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._tasks.values())

    def task_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._tasks)

    def current(self) -> dict[str, LoadedAdapter]:
        """Every task's current version, by task id."""
        with self._lock:
            return dict(sorted(self._tasks.items()))
