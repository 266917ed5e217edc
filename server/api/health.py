"""Probes: alive, and ready to serve."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from adapters_store import StoreUnavailable

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """The backbone is loaded, the engine runs, and the task store answers."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    try:
        await run_in_threadpool(engine.residency.store.ping)
    except StoreUnavailable as exc:
        return JSONResponse({"status": "store unavailable", "detail": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready", "model": engine.backbone.name})
