"""Prometheus metrics: one registry per app (so two apps in one process never collide), `GET /metrics`.

Request counts and token timings are recorded as they happen; the engine's and the residency manager's state is
read at scrape time by a collector, so the engine thread never touches a metric. No label takes a task id: labels
stay bounded (route templates, methods, statuses, finish reasons, tiers).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import InferenceAccess
from server.api.usage import LastUse

router = APIRouter(tags=["operations"])

# seconds; a CPU backbone sits at the top of both ranges, a GPU at the bottom
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Every metric the API records, in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "taskserve_http_requests",
            "HTTP requests by route template, method and status (499: the client left first).",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "taskserve_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, streams included.",
            ["route", "method"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "taskserve_prompt_tokens", "Prompt tokens prefilled (counted at the first token).", registry=registry
        )
        self.completion_tokens = Counter("taskserve_completion_tokens", "Tokens generated.", registry=registry)
        self.time_to_first_token = Histogram(
            "taskserve_time_to_first_token_seconds",
            "From the API taking a generation request (adapter load included) to its first token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "taskserve_inter_token_latency_seconds",
            "Time between consecutive tokens of one generation, as the API receives them.",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.generations = Counter(
            "taskserve_generations",
            "Generations ended, by finish reason (cancelled: the client stopped reading).",
            ["finish_reason"],
            registry=registry,
        )
        self.store_errors = Counter(
            "taskserve_store_errors", "Requests answered 503 because the task store was unavailable.", registry=registry
        )
        self.last_use = LastUse()  # per task, so never a Prometheus label; the console shows it

    def count_error(self, kind: str) -> None:
        """Called for every mapped error response, with its type."""
        if kind == "store_unavailable":
            self.store_errors.inc()

    def watch(self, app: FastAPI) -> None:
        """Read the engine of `app` at every scrape."""
        self.registry.register(EngineCollector(app))


class EngineCollector(Collector):
    """Gauges and counters read from the running engine and its residency manager at scrape time."""

    def __init__(self, app: FastAPI):
        self.app = app

    def collect(self) -> Iterator[Metric]:
        engine = getattr(self.app.state, "engine", None)
        if engine is None:  # still loading: nothing to report yet
            return
        stats = engine.stats()
        yield _gauge("taskserve_running_rows", "Rows in the running batch (decoding or prefilling).", stats.running)
        yield _gauge("taskserve_queued_requests", "Requests waiting for admission.", stats.waiting)
        yield _gauge("taskserve_max_batch_size", "The batch-size limit (setting).", engine.settings.max_batch_size)
        yield _gauge("taskserve_kv_tokens", "KV-cache columns the running rows hold (whole blocks).", stats.kv_tokens)
        yield _gauge("taskserve_max_kv_tokens", "KV-cache columns in the pool.", stats.kv_capacity)
        yield _counter("taskserve_engine_steps", "Engine steps (one forward each) since start.", stats.steps)

        residency = engine.residency
        stats = residency.stats
        yield _gauge("taskserve_resident_tasks", "Task versions loaded on the device.", stats.resident)
        bytes_ = GaugeMetricFamily(
            "taskserve_adapter_bytes",
            "Adapter bytes held per tier (device: materialised; host: raw files).",
            labels=["tier"],
        )
        bytes_.add_metric(["device"], stats.device_bytes)
        bytes_.add_metric(["host"], stats.host_bytes)
        yield bytes_
        budget = GaugeMetricFamily("taskserve_adapter_budget_bytes", "Adapter byte budget per tier.", labels=["tier"])
        budget.add_metric(["device"], residency.device_budget)
        budget.add_metric(["host"], residency.host_budget)
        yield budget
        yield _counter("taskserve_adapter_loads", "Task versions loaded onto the device.", stats.loads)
        yield _counter("taskserve_adapter_evictions", "Task versions evicted to make room.", stats.evictions)
        yield _counter("taskserve_adapter_load_failures", "Task version loads that failed.", stats.failures)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class RequestMetrics:
    """ASGI middleware: counts and times each HTTP request by the route template it matched."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped every handler

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path_format", None) or "unmatched"  # a template: bounded
            method = scope["method"]
            self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=route, method=method).observe(time.perf_counter() - started)


@router.get("/metrics", response_class=Response, dependencies=[InferenceAccess])
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this replica's metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
