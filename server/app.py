"""create_app(settings): wires the backbone, the engine and the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from adapters_store import open_store
from server.api import errors, generate, health, tasks
from server.config import Settings
from server.engine.backbone import Backbone
from server.engine.residency import Residency
from server.engine.scheduler import Engine

log = logging.getLogger("taskserve")


def create_app(settings: Settings | None = None, backbone: Backbone | None = None) -> FastAPI:
    """The service; pass a `backbone` to skip loading one (tests)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = backbone or await run_in_threadpool(
            Backbone.load, settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.model_cache
        )
        store = open_store(settings.store)
        residency = Residency(
            loaded, store, device_bytes=settings.device_adapter_bytes, host_bytes=settings.host_adapter_bytes
        )
        engine = Engine(loaded, settings, residency).start()
        app.state.engine = engine
        log.info("serving %s on %s (%s), tasks in %s", loaded.name, loaded.device, loaded.dtype, settings.store)
        try:
            yield
        finally:
            app.state.engine = None
            engine.stop()
            residency.close()
            store.close()

    app = FastAPI(title="taskserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    errors.install(app)
    for module in (health, generate, tasks):
        app.include_router(module.router)
    return app
