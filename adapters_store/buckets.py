"""Token buckets for rate limits, counted where the store says: in this process, or in Redis for every replica.

A bucket holds up to `capacity` units and refills at `rate` per second. `take` is all or nothing over several
buckets at once (a request must pass its key's and its tenant's limits together); `charge` takes units after the
fact (tokens, counted when a generation ends), so a level may go below zero and stay there until it is repaid.
A changed capacity or rate starts a full bucket.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Bucket", "Buckets", "Limit", "LocalBuckets", "Short"]


@dataclass(frozen=True)
class Limit:
    """One bucket: its name (unique per owner and unit), its size and refill rate, and what admission takes."""

    name: str  # e.g. "key:3f9c0a12ab34:requests"
    capacity: float
    rate: float  # units per second
    cost: float = 0.0  # taken by `take`; it needs at least one unit in the bucket either way


@dataclass(frozen=True)
class Short:
    """The bucket that refused: its index in the limits given, and its level then."""

    index: int
    level: float

    def wait(self, limit: Limit) -> float:
        """Seconds until it holds one unit again."""
        return max(0.0, (1 - self.level) / limit.rate)


class Buckets(ABC):
    shared = False  # whether other replicas count in the same buckets (then a call may wait for the network)

    @abstractmethod
    def take(self, limits: Sequence[Limit]) -> Short | None:
        """If every bucket holds at least one unit, take each one's `cost` and return None; else the first short
        one, taking nothing."""

    @abstractmethod
    def charge(self, limits: Sequence[Limit], amount: float) -> None:
        """Take `amount` from each bucket, whatever its level."""


@dataclass
class Bucket:
    """One in-process bucket; `level` may go below zero (a charge after the fact)."""

    capacity: float
    rate: float
    level: float
    at: float

    def refill(self, now: float) -> float:
        self.level = min(self.capacity, self.level + max(0.0, now - self.at) * self.rate)
        self.at = now
        return self.level

    def wait_for(self, amount: float) -> float:
        """Seconds until `level` reaches `amount`."""
        return max(0.0, (amount - self.level) / self.rate)


class LocalBuckets(Buckets):
    """Buckets in this process (a disk or in-memory store): each replica counts its own. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}

    def take(self, limits: Sequence[Limit]) -> Short | None:
        now = time.monotonic()
        with self._lock:
            buckets = [self._bucket(limit, now) for limit in limits]
            for index, bucket in enumerate(buckets):
                if bucket.level < 1:
                    return Short(index, bucket.level)
            for limit, bucket in zip(limits, buckets, strict=True):
                bucket.level -= limit.cost
        return None

    def charge(self, limits: Sequence[Limit], amount: float) -> None:
        now = time.monotonic()
        with self._lock:
            for limit in limits:
                self._bucket(limit, now).level -= amount

    def _bucket(self, limit: Limit, now: float) -> Bucket:
        bucket = self._buckets.get(limit.name)
        if bucket is None or (bucket.capacity, bucket.rate) != (limit.capacity, limit.rate):
            bucket = self._buckets[limit.name] = Bucket(limit.capacity, limit.rate, limit.capacity, now)
        bucket.refill(now)
        return bucket
