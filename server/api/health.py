"""Probes: alive, and ready to serve. Both answer from memory at once, whatever the load.

Nothing here waits on the engine, the store or a thread pool: start-up progress is a field the start-up task sets,
and the store's health is pinged on a thread of its own every few seconds, its last answer kept for `/ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from adapters_store import AdapterStore, StoreUnavailable

router = APIRouter(tags=["operations"])

PING_EVERY_S = 2.0  # how often the store is pinged
STALE_AFTER_S = 10.0  # a ping this old (hung, or its thread starved) means the store is not answering


@dataclass
class Startup:
    """Where start-up is: what it is doing since when, or why it failed."""

    stage: str = "starting"
    since: float = field(default_factory=time.monotonic)
    error: str | None = None

    def enter(self, stage: str) -> None:
        self.stage, self.since = stage, time.monotonic()

    def fail(self, error: BaseException) -> None:
        self.error = f"{self.stage} failed: {type(error).__name__}: {error}"

    @property
    def detail(self) -> str:
        return f"{self.stage} ({time.monotonic() - self.since:.0f} s so far)"


class StoreProbe:
    """The store's health, pinged on a dedicated thread; `/ready` reads the last answer and never waits."""

    def __init__(self, store: AdapterStore, every: float | None = None):
        self.store, self.every = store, every or PING_EVERY_S
        self.error: str | None = None
        self.answered_at = time.monotonic()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taskserve-store-probe")
        self._task: asyncio.Task | None = None

    async def start(self) -> StoreProbe:
        """Ping once (so the first answer of `/ready` is a real one), then every `every` seconds."""
        await self._ping()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self._ping()

    async def _ping(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self.store.ping)
            self.error = None
        except StoreUnavailable as exc:
            self.error = str(exc)
        except Exception as exc:  # a store that fails some other way cannot serve either
            self.error = f"the task store failed a ping: {type(exc).__name__}: {exc}"
        self.answered_at = time.monotonic()

    @property
    def problem(self) -> str | None:
        """Why the store cannot serve, or None."""
        silent = time.monotonic() - self.answered_at
        if silent > STALE_AFTER_S:
            return f"the task store has not answered a ping for {silent:.0f} s"
        return self.error


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """The process is alive (200 while the model loads too); 503 only if start-up failed for good."""
    startup: Startup = request.app.state.startup
    if startup.error is not None:
        return JSONResponse({"status": "failed", "detail": startup.error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """The backbone is loaded, the engine runs, and the task store answers; else 503 with what is missing."""
    state = request.app.state
    if state.startup.error is not None:
        return JSONResponse({"status": "failed", "detail": state.startup.error}, status_code=503)
    engine, probe = state.engine, getattr(state, "store_probe", None)
    if engine is None or probe is None:
        return JSONResponse({"status": "loading", "detail": state.startup.detail}, status_code=503)
    if (problem := probe.problem) is not None:
        return JSONResponse({"status": "store unavailable", "detail": problem}, status_code=503)
    return JSONResponse({"status": "ready", "model": engine.backbone.name})
