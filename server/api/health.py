"""Probes: alive, and ready to serve. Both answer from memory at once, whatever the load.

Nothing here waits on the engine, the store or a thread pool: start-up progress is a field the start-up task sets,
and the store's health is pinged on a thread of its own every few seconds, its last answer kept for `/ready`. With
`probe_port` set, a plain thread answers them on that port too, so they do not even wait behind other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

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


class Probe(BaseModel):
    status: str = Field(description="ok / ready, or loading, failed, store unavailable")
    model: str | None = Field(default=None, description="/ready: the backbone's name")
    detail: str | None = Field(default=None, description="what start-up is doing, or what is wrong")


NOT_READY = {503: {"model": Probe, "description": "loading, failed, or the store does not answer"}}


SEE_LOG = "details in the server's log"


def health_answer(state) -> tuple[int, Probe]:
    """The process is alive (200 while the model loads too); 503 only if start-up failed for good."""
    if state.startup.error is not None:
        return 503, Probe(status="failed", detail=SEE_LOG if not state.keys.open else state.startup.error)
    return 200, Probe(status="ok")


def ready_answer(state) -> tuple[int, Probe]:
    """The backbone is loaded, the engine runs, and the task store answers; else 503 with what is missing.

    Probes send no key: with keys configured, what went wrong (a store's address, a path) stays in the log.
    """
    private = not state.keys.open
    if state.startup.error is not None:
        return 503, Probe(status="failed", detail=SEE_LOG if private else state.startup.error)
    engine, probe = state.engine, getattr(state, "store_probe", None)
    if engine is None or probe is None:
        return 503, Probe(status="loading", detail=state.startup.detail)
    if (problem := probe.problem) is not None:
        return 503, Probe(status="store unavailable", detail=SEE_LOG if private else problem)
    return 200, Probe(status="ready", model=engine.backbone.name)


ANSWERS = {"/health": health_answer, "/ready": ready_answer}


def _respond(answer: tuple[int, Probe]) -> JSONResponse:
    status, body = answer
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


@router.get("/health", response_model=Probe, response_model_exclude_none=True, responses=NOT_READY)
async def health(request: Request) -> JSONResponse:
    """The process is alive (200 while the model loads too); 503 only if start-up failed for good."""
    return _respond(health_answer(request.app.state))


@router.get("/ready", response_model=Probe, response_model_exclude_none=True, responses=NOT_READY)
async def ready(request: Request) -> JSONResponse:
    """The backbone is loaded, the engine runs, and the task store answers; else 503 with what is missing."""
    return _respond(ready_answer(request.app.state))


class ProbeServer:
    """/health and /ready on a port of their own, answered by a plain thread from the same state.

    A probe on the main port waits its turn in the event loop behind every request it is busy with; here it waits
    for nothing but the interpreter lock, so Kubernetes' probes keep their 1 s timeout under any load.
    """

    def __init__(self, state, host: str, port: int):
        answers = {path: (lambda answer=answer: answer(state)) for path, answer in ANSWERS.items()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                answer = answers.get(self.path.split("?", 1)[0])
                status, body = answer() if answer else (404, None)
                payload = (body.model_dump_json(exclude_none=True) if body else _NOT_FOUND).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args) -> None:  # probes every few seconds: no access log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="taskserve-probes", daemon=True)

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_NOT_FOUND = '{"error": {"type": "not_found", "message": "this port answers only GET /health and GET /ready"}}'
