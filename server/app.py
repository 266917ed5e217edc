"""create_app(settings): wires the backbone, the engine, the routes, auth, limits, metrics and the offline docs.

The app answers at once: the backbone loads in the background while `/health` says 200 and `/ready` says 503 with
what start-up is doing, so probes and users get an answer instead of a refused connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI

from adapters_store import open_store, redacted
from server.api import admin, console, docs, errors, generate, health, lora_adapters, metrics, openai, stats, tasks
from server.api.admission import Admission
from server.api.auth import BadKeyThrottle, KeyRing
from server.api.health import ProbeServer, Startup, StoreProbe
from server.api.limits import BodyLimits
from server.api.metrics import Metrics, RequestMetrics
from server.api.quotas import Quotas
from server.config import Settings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.residency import Residency
from server.tasks import TaskService
from server.tenants import Tenants

log = logging.getLogger("taskserve")

T = TypeVar("T")
Closer = Callable[[], Awaitable[None] | None]


def create_app(
    settings: Settings | None = None,
    backbone: Backbone | None = None,
    *,
    on_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """The service; pass a `backbone` to skip loading one (tests: the app is then ready when its lifespan starts).

    `on_failure` is called if start-up fails for good (`python -m server` then stops with exit status 1).
    """
    settings = settings or Settings()
    keys = KeyRing.from_settings(settings)
    recorder = Metrics(settings.task_metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys.log_mode()
        closers: list[Closer] = []
        if settings.probe_port is not None:
            probes = ProbeServer(app.state, settings.host, settings.probe_port).start()
            closers.append(probes.stop)
            log.info("probes (/health, /ready) also on http://%s:%d", settings.host, probes.port)
        starting = asyncio.create_task(_start(app, settings, backbone, closers, on_failure))
        if backbone is not None:
            await starting
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            app.state.engine = None
            for close in reversed(closers):
                if (pending := close()) is not None:
                    await pending

    # docs_url/redoc_url off: FastAPI's pages load their scripts from a CDN; docs.install serves them locally
    app = FastAPI(title="taskserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.engine = None
    app.state.tasks = None
    app.state.tenants = None
    app.state.startup = Startup()
    app.state.keys = keys
    app.state.bad_keys = BadKeyThrottle(settings.bad_key_attempts)
    app.state.metrics = recorder
    app.state.admission = Admission(settings.max_queue_wait)
    app.state.started_at = int(time.time())
    recorder.watch(app)
    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        idle_timeout=settings.body_idle_timeout,
        total_timeout=settings.body_timeout,
    )
    app.add_middleware(RequestMetrics, metrics=recorder)
    errors.install(app, on_error=recorder.count_error)
    docs.install(app)
    # health and metrics are open (probes and scrapers carry no key); the other routers declare their access
    for module in (health, metrics, generate, tasks, openai, lora_adapters, stats, admin):
        app.include_router(module.router)
    if settings.console:
        console.install(app)
    return app


async def _start(
    app: FastAPI,
    settings: Settings,
    backbone: Backbone | None,
    closers: list[Closer],
    on_failure: Callable[[], None] | None,
) -> None:
    """Load, open and start everything the routes need; `app.state.engine` is set last, when all is ready."""
    startup: Startup = app.state.startup
    try:
        startup.enter("opening the task store")
        store = await asyncio.to_thread(open_store, settings.store)
        closers.append(store.close)
        tasks = TaskService(store)
        closers.append(tasks.close)
        quotas = app.state.admission.quotas = Quotas(store.rate_buckets())  # shared by replicas on Redis
        closers.append(quotas.close)
        app.state.tenants = Tenants(store)  # tenants' keys work from here on
        app.state.tasks = tasks  # task reads answer from here on, while the model loads
        app.state.store_probe = probe = await StoreProbe(store).start()
        closers.append(probe.stop)
        if backbone is None:
            startup.enter(f"loading the model {settings.model}")
            backbone = await _in_daemon_thread(
                Backbone.load,
                settings.model,
                device=settings.device,
                dtype=settings.dtype,
                cache_dir=settings.model_cache,
            )
        residency = Residency(
            backbone, store, device_bytes=settings.device_adapter_bytes, host_bytes=settings.host_adapter_bytes
        )
        closers.append(residency.close)
        tasks.attach(residency)
        engine = Engine(backbone, settings, residency, resolve=tasks.key).start()
        closers.append(engine.stop)
        if settings.preload:
            startup.enter(f"preloading {len(settings.preload)} tasks")
            pinned = await asyncio.to_thread(lora_adapters.preload, tasks, residency, settings)
            closers.append(lambda: lora_adapters.unpin(pinned))
    except Exception as exc:
        startup.fail(exc)
        log.exception("start-up failed: %s", startup.error)
        if on_failure is not None:
            on_failure()
        return
    app.state.engine = engine
    startup.enter("ready")
    log.info(
        "ready: serving %s on %s (%s), tasks in %s",
        backbone.name,
        backbone.device,
        backbone.dtype,
        redacted(settings.store),
    )


async def _in_daemon_thread(func: Callable[..., T], *args, **kwargs) -> T:
    """`func(*args, **kwargs)` on a daemon thread: a server stopped during a long load exits without waiting for it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = func(*args, **kwargs), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="taskserve-load-model", daemon=True).start()
    return await done
