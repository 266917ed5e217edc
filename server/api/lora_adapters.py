"""vLLM's adapter routes, `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (admin), on task versions.

Loading stores the PEFT directory at `lora_path` (a directory on this server, under one of `adapter_roots`) as a
version of the task `lora_name`, which then serves as a `model` like any task; unloading deletes the task. The
answers are vLLM's: a line of plain text on success, OpenAI's error shape otherwise.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from adapters_store import TASK_ID, TaskNotFound
from adapters_store.local import read_adapter_dir
from server.api.auth import AdminAccess, CallerDep
from server.api.deps import SettingsDep, TasksDep
from server.api.openai import ERRORS, OpenAIRoute
from server.api.openai_schemas import OpenAIError, Strict
from server.api.tasks import _check_writes
from server.config import Settings
from server.engine.request import BASE_TASK, InvalidRequest, UnknownTask
from server.engine.residency import Lease, Residency
from server.tasks import TaskService

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute, dependencies=[AdminAccess])
ANSWERS = {200: {"content": {"text/plain": {}}, "description": "a line saying what was done"}}


class LoadLoraAdapter(Strict):
    lora_name: str = Field(description="the task id to serve it as (a `model` of the OpenAI routes)")
    lora_path: str = Field(description="an absolute directory on this server, under one of its adapter_roots")
    load_inplace: bool = Field(default=False, description="replace a task of that name with a new version")


class UnloadLoraAdapter(Strict):
    lora_name: str = Field(description="the task to delete")
    lora_int_id: int | None = Field(default=None, description="accepted, as vLLM does; the name decides")


@router.post(
    "/load_lora_adapter", responses={**ANSWERS, **ERRORS, 403: {"model": OpenAIError}, 422: {"model": OpenAIError}}
)
async def load_lora_adapter(
    body: LoadLoraAdapter, tasks: TasksDep, settings: SettingsDep, caller: CallerDep
) -> PlainTextResponse:
    """Store the PEFT directory `lora_path` as the current version of the task `lora_name`."""
    _check_name(body.lora_name)
    _check_writes(caller, body.lora_name)
    done = await run_in_threadpool(load, tasks, settings, body.lora_name, body.lora_path, replace=body.load_inplace)
    return PlainTextResponse(done)


@router.post("/unload_lora_adapter", responses={**ANSWERS, **ERRORS, 403: {"model": OpenAIError}})
async def unload_lora_adapter(body: UnloadLoraAdapter, tasks: TasksDep, caller: CallerDep) -> PlainTextResponse:
    """Delete the task `lora_name` (every version); rows running on it finish first."""
    _check_name(body.lora_name)
    _check_writes(caller, body.lora_name)
    try:
        await run_in_threadpool(tasks.delete, body.lora_name)
    except (TaskNotFound, UnknownTask):
        raise UnknownTask(f"the LoRA adapter {body.lora_name!r} is not loaded") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def load(tasks: TaskService, settings: Settings, name: str, path: str, *, replace: bool, roots=None) -> str:
    """Read and store the directory as task `name`; `roots` None: the settings' adapter_roots (preload passes its
    own). A task that exists is replaced only with `replace`; identical files store nothing."""
    _check_name(name)
    allowed = settings.adapter_roots if roots is None else roots
    files = read_adapter_dir(path, allowed, max_bytes=settings.max_upload_bytes)
    try:
        tasks.info(name)
    except TaskNotFound:
        pass
    else:
        if tasks.identical_current(name, files) is not None:
            return f"Success: LoRA adapter '{name}' is already loaded with these files."
        if not replace:
            raise InvalidRequest(
                f"the LoRA adapter {name!r} is already loaded: pass load_inplace=true to replace it", param="lora_name"
            )
    info, _ = tasks.upload(name, files, f"loaded from {path}")
    return f"Success: LoRA adapter '{name}' added successfully (version {info.version})."


def _check_name(name: str) -> None:
    if TASK_ID.fullmatch(name) is None:
        raise InvalidRequest(f"{name!r} is not a valid task id", param="lora_name")


def preload(tasks: TaskService, residency: Residency, settings: Settings) -> list[Lease]:
    """Each of the settings' `preload` entries loaded on the device and pinned there: the leases, held until
    shutdown. `name=path` stores the directory as task `name` first (the operator's own setting, so any path)."""
    leases = []
    try:
        for entry in settings.preload:
            name, is_path, path = entry.partition("=")
            if is_path:
                log.info(load(tasks, settings, name, path, replace=True, roots=["/"]))
            if name == BASE_TASK:  # the backbone: always there
                continue
            key = tasks.current_key(name)
            if key is None:
                raise UnknownTask(f"preload: the task {name!r} does not exist")
            leases.append(residency.acquire(key))
            log.info("preloaded and pinned %s", leases[-1].adapter.key if leases[-1].adapter else name)
    except BaseException:
        unpin(leases)
        raise
    return leases


def unpin(leases: list[Lease]) -> None:
    for lease in leases:
        lease.release()
