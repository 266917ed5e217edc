"""`GET /v1/stats`: the numbers of `/metrics` as one small JSON object, for the console's live view.

Read from the same Prometheus registry `/metrics` renders, at request time, so the two never disagree and nothing
new is counted. Counters are totals since the process started: a reader computes rates from two samples of the same
`instance` (behind a proxy, consecutive polls may reach different replicas).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from fastapi import APIRouter, Request
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from server.api.auth import AuthorizedRoute, InferenceAccess
from server.api.schemas import ErrorBody

router = APIRouter(tags=["operations"], route_class=AuthorizedRoute, dependencies=[InferenceAccess])

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"

Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


class Histogram(BaseModel):
    count: float = Field(description="observations since start")
    sum: float = Field(description="their sum, in seconds")
    buckets: list[tuple[float, float]] = Field(
        description="[upper bound in seconds, cumulative count] per finite bound; `count` is the +Inf bucket"
    )


class Tiers(BaseModel):
    device: float
    host: float


class Stats(BaseModel):
    instance: str = Field(description="host:pid of the replica that answered; rates need two samples of one instance")
    time: float = Field(description="unix seconds when the numbers were read")
    started_at: float = Field(description="unix seconds when this replica started")
    prompt_tokens: float = Field(description="prompt tokens prefilled since start")
    completion_tokens: float = Field(description="tokens generated since start")
    generations: dict[str, float] = Field(description="generations ended since start, by finish reason")
    engine_steps: float
    running_rows: float
    queued_requests: float
    max_batch_size: float
    kv_tokens: float
    max_kv_tokens: float
    resident_tasks: float
    adapter_bytes: Tiers
    adapter_budget_bytes: Tiers
    adapter_loads: float
    adapter_evictions: float
    time_to_first_token: Histogram
    inter_token_latency: Histogram


@router.get("/v1/stats", response_model=Stats, responses={401: {"model": ErrorBody}})
async def stats(request: Request) -> Stats:
    """This replica's throughput counters, queue, batch, latency histograms and adapter residency, as JSON."""
    return read_stats(request.app.state.metrics.registry, started_at=request.app.state.started_at)


def read_stats(registry: CollectorRegistry, *, started_at: float) -> Stats:
    samples = _samples(registry)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    return Stats(
        instance=INSTANCE,
        time=time.time(),
        started_at=started_at,
        prompt_tokens=value("taskserve_prompt_tokens_total"),
        completion_tokens=value("taskserve_completion_tokens_total"),
        generations={
            dict(labels)["finish_reason"]: v
            for (name, labels), v in samples.items()
            if name == "taskserve_generations_total"
        },
        engine_steps=value("taskserve_engine_steps_total"),
        running_rows=value("taskserve_running_rows"),
        queued_requests=value("taskserve_queued_requests"),
        max_batch_size=value("taskserve_max_batch_size"),
        kv_tokens=value("taskserve_kv_tokens"),
        max_kv_tokens=value("taskserve_max_kv_tokens"),
        resident_tasks=value("taskserve_resident_tasks"),
        adapter_bytes=Tiers(
            device=value("taskserve_adapter_bytes", tier="device"), host=value("taskserve_adapter_bytes", tier="host")
        ),
        adapter_budget_bytes=Tiers(
            device=value("taskserve_adapter_budget_bytes", tier="device"),
            host=value("taskserve_adapter_budget_bytes", tier="host"),
        ),
        adapter_loads=value("taskserve_adapter_loads_total"),
        adapter_evictions=value("taskserve_adapter_evictions_total"),
        time_to_first_token=_histogram(samples, "taskserve_time_to_first_token_seconds"),
        inter_token_latency=_histogram(samples, "taskserve_inter_token_latency_seconds"),
    )


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the registry exposes: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def _histogram(samples: Samples, name: str) -> Histogram:
    bounds = ((float(dict(labels)["le"]), v) for (sample, labels), v in samples.items() if sample == f"{name}_bucket")
    buckets = sorted((le, v) for le, v in bounds if le != float("inf"))
    return Histogram(
        count=samples.get((f"{name}_count", ()), 0.0), sum=samples.get((f"{name}_sum", ()), 0.0), buckets=buckets
    )
