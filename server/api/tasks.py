"""Tasks: upload a PEFT adapter as a new version, list, inspect, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from starlette.concurrency import run_in_threadpool

from server.api.deps import EngineDep, SettingsDep
from server.api.errors import PayloadTooLarge
from server.api.schemas import ErrorBody, TaskList, TaskPublic
from server.engine.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoadedAdapter, load_peft_files
from server.engine.request import UnknownTask

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])


def _public(task_id: str, adapter: LoadedAdapter) -> TaskPublic:
    version = int(adapter.key.rsplit("@", 1)[1])
    return TaskPublic(
        task_id=task_id, version=version, kind=adapter.kind, parameters=adapter.parameters, bytes=adapter.nbytes
    )


@router.post(
    "/{task_id}/versions",
    status_code=201,
    response_model=TaskPublic,
    responses={code: {"model": ErrorBody} for code in (400, 413, 422)},
)
async def upload(task_id: str, files: Annotated[list[UploadFile], File()], engine: EngineDep, settings: SettingsDep):
    """Upload a PEFT `save_pretrained` directory's files as the task's new current version."""
    contents: dict[str, bytes] = {}
    total = 0
    for upload in files:
        data = await upload.read(settings.max_upload_bytes - total + 1)
        total += len(data)
        if total > settings.max_upload_bytes:
            raise PayloadTooLarge(f"the upload exceeds the limit of {settings.max_upload_bytes} bytes")
        contents[(upload.filename or "").rsplit("/", 1)[-1]] = data
    if "adapter_model.bin" in contents and WEIGHTS_FILE not in contents:
        raise AdapterError("adapter_model.bin is a pickle and is never loaded; re-save with safe_serialization=True")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in contents]
    if missing:
        raise AdapterError(
            f"the upload lacks {', '.join(missing)} (send the files of a PEFT save_pretrained directory)"
        )
    config, tensors = load_peft_files(contents[CONFIG_FILE], contents[WEIGHTS_FILE])
    adapter = await run_in_threadpool(engine.residency.register, task_id, config, tensors)
    return _public(task_id, adapter)


@router.get("", response_model=TaskList)
async def list_tasks(engine: EngineDep):
    """All tasks with their current version."""
    return TaskList(tasks=[_public(task_id, a) for task_id, a in engine.residency.current().items()])


@router.get("/{task_id}", response_model=TaskPublic, responses={404: {"model": ErrorBody}})
async def task_info(task_id: str, engine: EngineDep):
    """One task's current version, kind and size."""
    adapter = engine.residency.current().get(task_id)
    if adapter is None:
        raise UnknownTask(f"unknown task {task_id!r}")
    return _public(task_id, adapter)


@router.delete("/{task_id}", status_code=204, responses={404: {"model": ErrorBody}})
async def delete_task(task_id: str, engine: EngineDep) -> None:
    """Delete a task; rows already running on it finish first."""
    engine.residency.remove(task_id)
