"""Upload adapters to an in-process engine through the task layer, as the server does."""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from adapters_store import AdapterKey
from server.engine.adapters import LoadedAdapter
from server.engine.residency import Residency
from server.tasks import TaskService

_services: weakref.WeakKeyDictionary[Residency, TaskService] = weakref.WeakKeyDictionary()

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "template.json")


def tasks_of(residency: Residency) -> TaskService:
    """The task layer over `residency`'s store, attached to it (one per residency)."""
    service = _services.get(residency)
    if service is None:
        service = _services[residency] = TaskService(residency.store, residency)
    return service


def peft_files(path: str | Path) -> dict[str, bytes]:
    """The files of a PEFT `save_pretrained` directory, as an upload carries them; for a composite task's
    directory (`task.json`), the manifest and each component's files, named as the store keeps them."""
    path = Path(path)
    if (path / "task.json").is_file():
        folders = [p for p in sorted(path.iterdir()) if p.is_dir()]
        files = {f"{d.name}.{name}": data for d in folders for name, data in peft_files(d).items()}
        return {"task.json": (path / "task.json").read_bytes(), **files}
    return {name: (path / name).read_bytes() for name in PEFT_FILES if (path / name).is_file()}


def files_of(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps(dict(config)).encode(),
        "adapter_model.safetensors": save_safetensors({k: v.contiguous() for k, v in tensors.items()}),
    }


def serve(residency: Residency, task_id: str, source: str | Path | Mapping[str, bytes]) -> LoadedAdapter:
    """Upload `source` (a PEFT directory or its files) as `task_id`'s new version; return it as served."""
    files = source if isinstance(source, Mapping) else peft_files(source)
    info, _ = tasks_of(residency).upload(task_id, files)
    return residency.get(info.key)


def served(residency: Residency, task_id: str) -> LoadedAdapter | None:
    """The task's current version as served."""
    return residency.get(tasks_of(residency).current_key(task_id))


def key(task_id: str, version: int) -> AdapterKey:
    return AdapterKey(task_id, version)
