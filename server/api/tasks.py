"""Tasks: upload a version (PEFT files, an archive, or a template), list, inspect, roll back, delete."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from adapters_store import TaskNotFound, VersionInfo
from adapters_store.composite import COMPOSITE_KIND, parse_components
from adapters_store.format import TEMPLATE_FILE, read_upload
from server.api.auth import AdminAccess, AuthorizedRoute, CallerDep, InferenceAccess
from server.api.deps import SettingsDep, TasksDep
from server.api.errors import Forbidden, PayloadTooLarge
from server.api.fields import Text
from server.api.limits import uploads
from server.api.schemas import ComponentPublic, ErrorBody, Rollback, TaskList, TaskPublic, TemplateUpload, VersionPublic
from server.engine.request import InvalidRequest
from server.tenants import Caller

# reading needs any key; upload, rollback and delete add AdminAccess
router = APIRouter(prefix="/v1/tasks", tags=["tasks"], route_class=AuthorizedRoute, dependencies=[InferenceAccess])

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 422, 503)}
ADMIN_ERRORS = {**ERRORS, 403: {"model": ErrorBody}}
UNCHANGED = {"model": VersionPublic, "description": "the upload is identical to the current version: nothing stored"}


def _kind(stored: str) -> dict:
    """`kind` and, for a composite, its `components` (the store records them in the kind)."""
    components = parse_components(stored)
    if components is None:
        return {"kind": stored}
    return {"kind": COMPOSITE_KIND, "components": [ComponentPublic(**asdict(c)) for c in components]}


def _version(info: VersionInfo) -> VersionPublic:
    return VersionPublic(
        task_id=info.task_id,
        version=info.version,
        **_kind(info.kind),
        parameters=info.parameters,
        bytes=info.bytes,
        sha256=info.sha256,
        created_at=info.created_at,
        description=info.description,
    )


@router.post(
    "/{task_id:path}/versions",
    status_code=201,
    response_model=VersionPublic,
    responses={200: UNCHANGED, **ADMIN_ERRORS},
    dependencies=[AdminAccess],
)
@uploads
async def upload(
    task_id: str,
    request: Request,
    response: Response,
    tasks: TasksDep,
    settings: SettingsDep,
    caller: CallerDep,
    files: Annotated[list[UploadFile] | None, File(description="the files of a PEFT save_pretrained directory")] = None,
    archive: Annotated[UploadFile | None, File(description="one .tar.gz or .zip of such a directory")] = None,
    description: Annotated[Text | None, Form()] = None,
):
    """Upload a new version (multipart `files` or `archive`, or a JSON template); it becomes current.

    An upload identical to the current version (same files, no other description) stores nothing: 200 with it.
    """
    if request.headers.get("content-type", "").startswith("application/json"):
        body = TemplateUpload.model_validate(await _json(request))
        contents = {TEMPLATE_FILE: json.dumps(body.template).encode()}
        description = body.description
    else:
        parts = {f.filename or f"file{i}": await _read(f, settings.max_upload_bytes) for i, f in enumerate(files or [])}
        blob = await _read(archive, settings.max_upload_bytes) if archive is not None else None
        contents = read_upload(parts or None, blob, max_bytes=settings.max_upload_bytes)
    _check_writes(caller, task_id)
    info, created = await run_in_threadpool(tasks.upload, task_id, contents, description)
    if not created:
        response.status_code = 200
    return _version(info)


async def _read(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{upload.filename!r} exceeds the upload limit of {limit} bytes")
    return data


async def _json(request: Request) -> object:
    """The body as JSON (its size is bounded by `limits.BodyLimits`); nesting too deep to parse is a 400 too."""
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None


@router.get("", response_model=TaskList, responses=ERRORS)
async def list_tasks(
    tasks: TasksDep,
    caller: CallerDep,
    after: Annotated[str | None, Query(description="the last task id of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
):
    """Tasks in id order, a page at a time, each with its current version."""
    if caller.key is None:
        page = await run_in_threadpool(tasks.page, after=after, limit=limit)
    else:  # a tenant's key lists its namespace and its grants
        grants = caller.tenant.grants if caller.tenant is not None else ()
        page = await run_in_threadpool(tasks.page_within, caller.key.tenant, grants, after=after, limit=limit)
    return TaskList(tasks=[_version(t.current) for t in page.tasks], next_after=page.next_after)


@router.get("/{task_id:path}", response_model=TaskPublic, responses=ERRORS)
async def task_info(task_id: str, tasks: TasksDep, caller: CallerDep):
    """One task: its current version, every version, and whether the current one is on the device."""
    _check_sees(caller, task_id)
    info = await run_in_threadpool(tasks.info, task_id)
    current = info.current_info
    return TaskPublic(
        task_id=task_id,
        version=current.version,
        **_kind(current.kind),
        parameters=current.parameters,
        bytes=current.bytes,
        resident=tasks.is_resident(current.key),
        versions=[_version(v) for v in info.versions],
    )


@router.post(
    "/{task_id:path}/rollback", response_model=VersionPublic, responses=ADMIN_ERRORS, dependencies=[AdminAccess]
)
async def rollback(task_id: str, body: Rollback, tasks: TasksDep, caller: CallerDep):
    """Make an earlier (or later) version current again."""
    _check_writes(caller, task_id)
    return _version(await run_in_threadpool(tasks.rollback, task_id, body.version))


@router.delete("/{task_id:path}", status_code=204, responses=ADMIN_ERRORS, dependencies=[AdminAccess])
async def delete_task(task_id: str, tasks: TasksDep, caller: CallerDep) -> None:
    """Delete a task and all its versions; rows already running on it finish first."""
    _check_writes(caller, task_id)
    await run_in_threadpool(tasks.delete, task_id)


def _check_sees(caller: Caller, task_id: str) -> None:
    """Another tenant's task answers exactly as a missing one does: ids do not leak."""
    if not caller.sees(task_id):
        raise TaskNotFound(f"unknown task {task_id!r}")


def _check_writes(caller: Caller, task_id: str) -> None:
    if not caller.writes(task_id):
        _check_sees(caller, task_id)
        raise Forbidden(f"a tenant's admin key writes only tasks in its namespace ({caller.tenant_name}/...)")
