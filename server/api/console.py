"""The web console: one HTML page and its ES modules at /console/, plus the little JSON it needs beyond /v1.

Everything the console shows comes from the public API (/v1/tasks, generate, /v1/stats); the three routes under
/console/api add only what no public route says: the caller's scope, a version's config file, and which tasks are
resident and when they were last used here. The page and its assets need no key (a browser cannot send one on a
navigation); the data does, exactly as for any other client.

The assets are the files under server/console/assets, read once at start-up and served from memory under a digest
of their content, so they are cached for good and a new release changes every URL. The page itself is never
cached and carries a Content-Security-Policy that allows nothing but this origin's own scripts, styles and API, and
no HTML built from strings (Trusted Types): text from tasks can only ever become text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from adapters_store import AdapterKey
from adapters_store.format import COMPOSITE_FILE, CONFIG_FILE, TEMPLATE_FILE
from server.api.auth import Access, AuthorizedRoute, InferenceAccess, caller_scope
from server.api.deps import EngineDep, MetricsDep, SettingsDep, TasksDep
from server.api.stats import INSTANCE
from server.engine.request import InvalidRequest

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
ASSET_CACHE = "public, max-age=31536000, immutable"  # safe: the URL changes whenever the content does
MAX_USAGE_KEYS = 1000


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


class Assets:
    """The console's files, read once; `digest` names this exact set in every asset URL."""

    def __init__(self, root: Path = CONSOLE_DIR) -> None:
        files = {
            path.relative_to(root / "assets").as_posix(): path.read_bytes()
            for path in sorted((root / "assets").rglob("*"))
            if path.is_file() and path.suffix in MEDIA_TYPES
        }
        whole = hashlib.sha256()
        self.files: dict[str, Asset] = {}
        for name, body in files.items():
            digest = hashlib.sha256(body).hexdigest()
            whole.update(f"{name}\0{digest}\n".encode())
            self.files[name] = Asset(body, MEDIA_TYPES[Path(name).suffix], f'"{digest[:32]}"')
        self.digest = whole.hexdigest()[:16]
        self.page = (root / "index.html").read_text().replace("{{assets}}", f"assets/{self.digest}")


def install(app: FastAPI) -> None:
    """Serve the console at /console/ and send / there."""
    assets = Assets()
    pages = APIRouter(include_in_schema=False)

    # Relative redirects: behind a proxy that mounts the app under a prefix, they stay under it.
    @pages.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("console/", status_code=307)

    @pages.get("/console")
    async def console_no_slash() -> RedirectResponse:
        return RedirectResponse("console/", status_code=307)

    @pages.get("/console/")
    async def console_page() -> HTMLResponse:
        return HTMLResponse(assets.page, headers=PAGE_HEADERS)

    @pages.get("/console/assets/{digest}/{name:path}")
    async def console_asset(digest: str, name: str, request: Request) -> Response:
        asset = assets.files.get(name)
        if digest != assets.digest or asset is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)  # like any unknown path
        headers = {"ETag": asset.etag, "Cache-Control": ASSET_CACHE, "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    app.include_router(pages)
    app.include_router(api)


# --- the JSON the console needs beyond /v1 ---------------------------------------------------------------------

api = APIRouter(
    prefix="/console/api", include_in_schema=False, route_class=AuthorizedRoute, dependencies=[InferenceAccess]
)


class Session(BaseModel):
    scope: str = Field(description="what the caller's key may do: 'admin' or 'inference'")
    open: bool = Field(description="no keys are configured: anyone may do anything")
    model: str
    max_new_tokens: int
    max_upload_bytes: int
    instance: str


@api.get("/session", response_model=Session)
async def session(
    scope: Annotated[Access, Depends(caller_scope)], engine: EngineDep, settings: SettingsDep, request: Request
):
    """The caller's scope and the limits the console's forms respect."""
    return Session(
        scope=scope.name.lower(),
        open=request.app.state.keys.open,
        model=engine.backbone.name,
        max_new_tokens=settings.max_new_tokens,
        max_upload_bytes=settings.max_upload_bytes,
        instance=INSTANCE,
    )


@api.get("/tasks/{task_id:path}/versions/{version}/config")
async def version_config(task_id: str, version: Annotated[int, PathParam(ge=1)], tasks: TasksDep) -> dict:
    """The version's adapter_config.json or template.json, as stored; a composite's task.json and each component's
    adapter_config.json, by component."""
    artifact = await run_in_threadpool(tasks.files, AdapterKey(task_id, version))
    files = artifact.files
    if COMPOSITE_FILE in files:
        configs = {n.partition(".")[0]: json.loads(data) for n, data in files.items() if n.endswith(CONFIG_FILE)}
        content = {COMPOSITE_FILE: json.loads(files[COMPOSITE_FILE]), **configs}
        return {"task_id": task_id, "version": version, "file": COMPOSITE_FILE, "content": content}
    name = TEMPLATE_FILE if TEMPLATE_FILE in artifact.files else CONFIG_FILE
    return {"task_id": task_id, "version": version, "file": name, "content": json.loads(artifact.files[name])}


@api.get("/usage")
async def usage(
    tasks: TasksDep,
    metrics: MetricsDep,
    versions: Annotated[str, Query(description="task@version,... (at most 1000)")] = "",
) -> dict:
    """For each task version: is it on this replica's device, and when did this replica last run its task."""
    keys = [key for key in versions.split(",") if key]
    if len(keys) > MAX_USAGE_KEYS:
        raise InvalidRequest(f"at most {MAX_USAGE_KEYS} versions at once, got {len(keys)}")
    found = {}
    for text in keys:
        try:
            key = AdapterKey.parse(text)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        resident = tasks.is_resident(key)
        found[text] = {"resident": resident, "last_used": metrics.last_use.get(key.task_id)}
    return {"instance": INSTANCE, "usage": found}
