"""create_app(settings): wires the backbone, the engine, the routes, auth, metrics and the offline docs."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from adapters_store import open_store
from server.api import console, docs, errors, generate, health, metrics, openai, stats, tasks
from server.api.auth import KeyRing
from server.api.metrics import Metrics, RequestMetrics
from server.config import Settings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.residency import Residency

log = logging.getLogger("taskserve")


def create_app(settings: Settings | None = None, backbone: Backbone | None = None) -> FastAPI:
    """The service; pass a `backbone` to skip loading one (tests)."""
    settings = settings or Settings()
    keys = KeyRing.from_settings(settings)
    recorder = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys.log_mode()
        loaded = backbone or await run_in_threadpool(
            Backbone.load, settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.model_cache
        )
        store = open_store(settings.store)
        residency = Residency(
            loaded, store, device_bytes=settings.device_adapter_bytes, host_bytes=settings.host_adapter_bytes
        )
        engine = Engine(loaded, settings, residency).start()
        app.state.engine = engine
        app.state.started_at = int(time.time())
        log.info("serving %s on %s (%s), tasks in %s", loaded.name, loaded.device, loaded.dtype, settings.store)
        try:
            yield
        finally:
            app.state.engine = None
            engine.stop()
            residency.close()
            store.close()

    # docs_url/redoc_url off: FastAPI's pages load their scripts from a CDN; docs.install serves them locally
    app = FastAPI(title="taskserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.engine = None
    app.state.keys = keys
    app.state.metrics = recorder
    app.state.started_at = int(time.time())
    recorder.watch(app)
    app.add_middleware(RequestMetrics, metrics=recorder)
    errors.install(app, on_error=recorder.count_error)
    docs.install(app)
    # health and metrics are open (probes and scrapers carry no key); the other routers declare their access
    for module in (health, metrics, generate, tasks, openai, stats):
        app.include_router(module.router)
    if settings.console:
        console.install(app)
    return app
