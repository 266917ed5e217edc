"""Prometheus metrics: one registry per app (so two apps in one process never collide), `GET /metrics`.

Request counts and token timings are recorded as they happen; the engine's and the residency manager's state is
read at scrape time by a collector, so the engine thread never touches a metric. Labels stay bounded: route
templates, methods, statuses, finish reasons, tiers, tenants (created by bootstrap admins only), and task ids only
when `task_metrics` opts in, for at most that many tasks (the first seen; every other one counts as `_other`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import GlobalAccess
from server.api.usage import LastUse
from server.engine.request import TokenDelta
from server.tenants import Caller

router = APIRouter(tags=["operations"])

# seconds; a CPU backbone sits at the top of both ranges, a GPU at the bottom
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GLOBAL_TENANT = "_global"  # the tenant label of bootstrap keys and of an open server (no namespace starts with _)
OTHER_TASKS = "_other"  # the task label of tasks past the `task_metrics` limit (no task id starts with _)


class Usage:
    """Requests, tokens in and out, queue time and time to first token by one label (a tenant, or a task)."""

    def __init__(self, scope: str, label: str, registry: CollectorRegistry):
        def counter(name: str, doc: str) -> Counter:
            return Counter(f"taskserve_{scope}_{name}", f"{doc}, by {label}.", [label], registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                f"taskserve_{scope}_{name}", f"{doc}, by {label}.", [label], buckets=buckets, registry=registry
            )

        self.requests = counter("requests", "Generation requests admitted")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled")
        self.completion_tokens = counter("completion_tokens", "Tokens generated")
        self.queue_seconds = histogram(
            "queue_seconds", "Time a request waited in the engine's queue for a place in the batch", QUEUE_BUCKETS
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From the API taking a generation request to its first token", TTFT_BUCKETS
        )


class TaskLabels:
    """At most `limit` task ids become label values, the first seen first; the rest share `_other`. Thread-safe."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task_id: str) -> str:
        with self._lock:
            if task_id in self._seen:
                return task_id
            if len(self._seen) < self.limit:
                self._seen.add(task_id)
                return task_id
        return OTHER_TASKS


class Metrics:
    """Every metric the API records, in the app's own registry.

    `task_metrics`: per-task series for up to that many task ids (0: none, no label ever takes a task id).
    """

    def __init__(self, task_metrics: int = 0) -> None:
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
        self.queue_seconds = Histogram(
            "taskserve_queue_seconds",
            "Time a request waited in the engine's queue for a place in the batch.",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.tenants = Usage("tenant", "tenant", registry)
        self.rate_limited = Counter(
            "taskserve_tenant_rate_limited",
            "Generation requests refused by a key's or tenant's quota (429), by tenant.",
            ["tenant"],
            registry=registry,
        )
        self.tasks = Usage("task", "task", registry) if task_metrics > 0 else None
        self.task_label = TaskLabels(task_metrics)
        self.last_use = LastUse()  # per task, never a label unless task_metrics opts in; the console shows it

    def meter(self, task_id: str, caller: Caller | None) -> Meter:
        """What one generation request records, under its tenant's (and, opted in, its task's) labels.

        Only for a task that exists (its lease was granted): unknown ids must not take up task labels.
        """
        usages = [(self.tenants, tenant_label(caller))]
        if self.tasks is not None:
            usages.append((self.tasks, self.task_label(task_id)))
        return Meter(self, usages)

    def count_error(self, kind: str) -> None:
        """Called for every mapped error response, with its type."""
        if kind == "store_unavailable":
            self.store_errors.inc()

    def watch(self, app: FastAPI) -> None:
        """Read the engine of `app` at every scrape."""
        self.registry.register(EngineCollector(app))


def tenant_label(caller: Caller | None) -> str:
    tenant = caller.tenant_name if caller is not None else None
    return tenant or GLOBAL_TENANT


class Meter:
    """One generation request's metrics: the global series, and its tenant's and (opted in) its task's, whose
    labelled children are looked up once here rather than at every token."""

    def __init__(self, metrics: Metrics, usages: list[tuple[Usage, str]]):
        self.metrics = metrics
        self._children = {
            name: [getattr(usage, name).labels(label) for usage, label in usages]
            for name in ("requests", "prompt_tokens", "completion_tokens", "queue_seconds", "time_to_first_token")
        }
        self._generated = 0  # tokens not yet added to the tenant's and task's counters (they are, as a stream ends)

    def _each(self, name: str) -> list:
        return self._children[name]

    def admitted(self) -> None:
        for counter in self._each("requests"):
            counter.inc()

    def first_token(self, seconds: float, delta: TokenDelta, prefilled: bool) -> None:
        """A stream's first token, `seconds` after the request arrived; `prefilled`: its row computed the prompt
        (the other choices of a request share it, so its tokens and queue time count once)."""
        m = self.metrics
        m.time_to_first_token.observe(seconds)
        for histogram in self._each("time_to_first_token"):
            histogram.observe(seconds)
        if not prefilled:
            return
        m.prompt_tokens.inc(delta.prompt_tokens)
        for counter in self._each("prompt_tokens"):
            counter.inc(delta.prompt_tokens)
        if delta.queue_seconds is not None:
            m.queue_seconds.observe(delta.queue_seconds)
            for histogram in self._each("queue_seconds"):
                histogram.observe(delta.queue_seconds)

    def tokens(self, count: int, gap: float | None) -> None:
        """`count` tokens generated, `gap` seconds apart (None: the first of the stream)."""
        m = self.metrics
        m.completion_tokens.inc(count)
        self._generated += count
        if gap is not None:
            for _ in range(count):
                m.inter_token_latency.observe(gap)

    def finished(self, reason: str) -> None:
        """A stream ended (each choice of a request ends its own)."""
        self.metrics.generations.labels(finish_reason=reason).inc()
        generated, self._generated = self._generated, 0
        for counter in self._each("completion_tokens"):
            counter.inc(generated)


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


@router.get("/metrics", response_class=Response, dependencies=[GlobalAccess])
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this replica's metrics; a tenant's key is refused (403): they name every
    tenant (and, opted in, task ids)."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
