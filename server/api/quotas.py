"""Quotas of tenants and their keys: requests per second, tokens per minute, rows running at once (HTTP 429).

Token buckets, one per limit per key or tenant, on this replica: a bucket holds up to one second of requests (or one
minute of tokens) and refills continuously. A request is admitted when every bucket that applies has a request (and
a positive token balance) left and its tenant has a row to spare; the tokens it used, prompt and completion, are
charged when it ends, so a long answer may overdraw the balance and the next request waits until it is repaid.
A refusal carries `Retry-After` and OpenAI's `x-ratelimit-*` headers for the limit that refused it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from server.engine.request import QueueFull
from server.tenants import Caller


class OverQuota(QueueFull):
    """A key or tenant over one of its quotas (HTTP 429 `rate_limited`)."""

    def __init__(self, message: str, retry_after: int, headers: dict[str, str]):
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers


@dataclass
class Bucket:
    """`capacity` units refilling at `rate` per second; `level` may go below zero (a charge after the fact)."""

    capacity: float
    rate: float
    level: float
    at: float

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level

    def wait_for(self, amount: float) -> float:
        """Seconds until `level` reaches `amount`."""
        return max(0.0, (amount - self.level) / self.rate)


class Spend:
    """One admitted request's hold on its quotas; `release(tokens)` once when it ends (idempotent)."""

    def __init__(self, quotas: Quotas, token_buckets: list[Bucket], tenant: str | None):
        self._quotas: Quotas | None = quotas
        self._token_buckets, self._tenant = token_buckets, tenant

    def release(self, tokens: int = 0) -> None:
        quotas, self._quotas = self._quotas, None
        if quotas is not None:
            quotas.ended(self._token_buckets, self._tenant, tokens)


class Quotas:
    """Every key's and tenant's buckets on this replica. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}  # (owner, "requests" | "tokens") -> bucket
        self._running: dict[str, int] = {}  # tenant -> rows admitted and not ended

    def admit(self, caller: Caller) -> Spend | None:
        """A hold on the caller's quotas, or `OverQuota`. Global callers have none."""
        if caller.key is None:
            return None
        owners = [(f"key:{caller.key.id}", caller.key.quota)]
        if caller.tenant is not None:
            owners.append((f"tenant:{caller.tenant.name}", caller.tenant.quota))
        now = time.monotonic()
        with self._lock:
            requests, tokens = [], []
            for owner, quota in owners:
                if quota.requests_per_s is not None:
                    bucket = self._bucket(owner, "requests", quota.requests_per_s, quota.requests_per_s, now)
                    if bucket.level < 1:
                        raise _refused(f"{owner} is over {quota.requests_per_s:g} requests/s", bucket, 1, "requests")
                    requests.append(bucket)
                if quota.tokens_per_min is not None:
                    bucket = self._bucket(owner, "tokens", quota.tokens_per_min, quota.tokens_per_min / 60, now)
                    if bucket.level <= 0:
                        raise _refused(f"{owner} is over {quota.tokens_per_min} tokens/min", bucket, 1, "tokens")
                    tokens.append(bucket)
            tenant = caller.tenant
            if tenant is not None and tenant.quota.running is not None:
                if self._running.get(tenant.name, 0) >= tenant.quota.running:
                    raise OverQuota(
                        f"tenant:{tenant.name} already runs its limit of {tenant.quota.running} requests; retry soon",
                        retry_after=1,
                        headers={"x-ratelimit-limit-running": str(tenant.quota.running)},
                    )
                self._running[tenant.name] = self._running.get(tenant.name, 0) + 1
            for bucket in requests:
                bucket.level -= 1
        return Spend(self, tokens, None if tenant is None or tenant.quota.running is None else tenant.name)

    def ended(self, token_buckets: list[Bucket], tenant: str | None, tokens: int) -> None:
        with self._lock:
            for bucket in token_buckets:
                bucket.level -= tokens
            if tenant is not None:
                self._running[tenant] -= 1

    def _bucket(self, owner: str, unit: str, capacity: float, rate: float, now: float) -> Bucket:
        """The owner's bucket, refilled to now; a changed quota starts a full one."""
        bucket = self._buckets.get((owner, unit))
        if bucket is None or (bucket.capacity, bucket.rate) != (capacity, rate):
            bucket = self._buckets[(owner, unit)] = Bucket(capacity, rate, capacity, now)
        bucket.refill(now)
        return bucket


def _refused(message: str, bucket: Bucket, needed: float, unit: str) -> OverQuota:
    wait = bucket.wait_for(needed)
    return OverQuota(
        f"{message}; retry in {wait:.1f} s",
        retry_after=max(1, math.ceil(wait)),
        headers={
            f"x-ratelimit-limit-{unit}": f"{bucket.capacity:g}",
            f"x-ratelimit-remaining-{unit}": str(max(0, math.floor(bucket.level))),
            f"x-ratelimit-reset-{unit}": f"{wait:.3f}s",
        },
    )
