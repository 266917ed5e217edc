"""Quotas of tenants and their keys: requests per second, tokens per minute, rows running at once (HTTP 429).

Token buckets (`adapters_store.buckets`), one per limit per key or tenant, counted where the store says: in Redis,
so that every replica on it enforces one limit together, or in this process with a disk or in-memory store. A
bucket holds one second of requests (or one minute of tokens), at least one, and refills continuously. A request is
admitted when every bucket that applies has a unit left and its tenant has a row to spare on this replica (rows are
this replica's batch, so that limit is per replica); the tokens it used, prompt and completion, are charged when
it ends, so a long answer may overdraw the balance and the next request waits until it is repaid.
A refusal carries `Retry-After` and OpenAI's `x-ratelimit-*` headers for the limit that refused it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from adapters_store import StoreError
from adapters_store.buckets import Buckets, Limit, LocalBuckets, Short
from server.engine.request import QueueFull
from server.tenants import Caller

log = logging.getLogger(__name__)


class OverQuota(QueueFull):
    """A key or tenant over one of its quotas (HTTP 429 `rate_limited`)."""

    def __init__(self, message: str, retry_after: int, headers: dict[str, str]):
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers


class Spend:
    """One admitted request's hold on its quotas; `release(tokens)` once when it ends (idempotent)."""

    def __init__(self, quotas: Quotas, token_limits: list[Limit], tenant: str | None):
        self._quotas: Quotas | None = quotas
        self._token_limits, self._tenant = token_limits, tenant

    def release(self, tokens: int = 0) -> None:
        quotas, self._quotas = self._quotas, None
        if quotas is not None:
            quotas.ended(self._token_limits, self._tenant, tokens)


class Quotas:
    """Every key's and tenant's limits, over `buckets` (this process's by default). Thread-safe.

    With shared buckets `admit` waits for Redis: call it off the event loop. Charges after the fact go to a
    background thread there, so a request's end never waits for the network.
    """

    def __init__(self, buckets: Buckets | None = None) -> None:
        self.buckets = buckets if buckets is not None else LocalBuckets()
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}  # tenant -> rows admitted here and not ended
        self._charger = ThreadPoolExecutor(1, thread_name_prefix="taskserve-quota") if self.buckets.shared else None

    def close(self) -> None:
        if self._charger is not None:
            self._charger.shutdown(wait=True)

    def admit(self, caller: Caller) -> Spend | None:
        """A hold on the caller's quotas, or `OverQuota`. Global callers have none."""
        if caller.key is None:
            return None
        owners = [(f"key:{caller.key.id}", caller.key.quota)]
        if caller.tenant is not None:
            owners.append((f"tenant:{caller.tenant.name}", caller.tenant.quota))
        limits, what, tokens = [], [], []
        for owner, quota in owners:
            if quota.requests_per_s is not None:
                rate = float(quota.requests_per_s)
                limits.append(Limit(f"{owner}:requests", max(1.0, rate), rate, cost=1.0))
                what.append((f"{owner} is over {rate:g} requests/s", f"{rate:g}", "requests"))
            if quota.tokens_per_min is not None:
                per_min = float(quota.tokens_per_min)
                tokens.append(Limit(f"{owner}:tokens", max(1.0, per_min), per_min / 60))
                limits.append(tokens[-1])
                what.append((f"{owner} is over {quota.tokens_per_min} tokens/min", f"{per_min:g}", "tokens"))
        tenant = caller.tenant.name if caller.tenant is not None and caller.tenant.quota.running is not None else None
        if tenant is not None:
            self._take_row(tenant, caller.tenant.quota.running)  # type: ignore[union-attr]
        try:
            short = self.buckets.take(limits) if limits else None
        except BaseException:
            self._give_row(tenant)
            raise
        if short is not None:
            self._give_row(tenant)
            raise _refused(short, limits[short.index], *what[short.index])
        return Spend(self, tokens, tenant)

    def ended(self, token_limits: Sequence[Limit], tenant: str | None, tokens: int) -> None:
        self._give_row(tenant)
        if not token_limits or tokens <= 0:
            return
        if self._charger is None:
            self._charge(token_limits, tokens)
        else:
            self._charger.submit(self._charge, token_limits, tokens)

    def _charge(self, token_limits: Sequence[Limit], tokens: int) -> None:
        try:
            self.buckets.charge(token_limits, tokens)
        except StoreError as exc:  # the request is over: its tokens go uncounted, which the log says
            log.warning("could not charge %d tokens to %s: %s", tokens, token_limits[0].name, exc)

    def _take_row(self, tenant: str, limit: int) -> None:
        with self._lock:
            running = self._running.get(tenant, 0)
            if running >= limit:
                raise OverQuota(
                    f"tenant:{tenant} already runs its limit of {limit} requests; retry soon",
                    retry_after=1,
                    headers={"x-ratelimit-limit-running": str(limit)},
                )
            self._running[tenant] = running + 1

    def _give_row(self, tenant: str | None) -> None:
        if tenant is None:
            return
        with self._lock:
            self._running[tenant] -= 1
            if not self._running[tenant]:
                del self._running[tenant]


def _refused(short: Short, limit: Limit, message: str, quota: str, unit: str) -> OverQuota:
    wait = short.wait(limit)
    return OverQuota(
        f"{message}; retry in {wait:.1f} s",
        retry_after=max(1, math.ceil(wait)),
        headers={
            f"x-ratelimit-limit-{unit}": quota,
            f"x-ratelimit-remaining-{unit}": str(max(0, math.floor(short.level))),
            f"x-ratelimit-reset-{unit}": f"{wait:.3f}s",
        },
    )
