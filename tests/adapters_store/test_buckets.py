"""Quota buckets, in this process (disk store) and in Redis (shared by every replica on it): the same rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from adapters_store import open_store
from adapters_store.buckets import Limit

REQUESTS = Limit("key:k:requests", capacity=2.0, rate=0.001, cost=1.0)  # two, then one per 1,000 s
TOKENS = Limit("key:k:tokens", capacity=100.0, rate=0.001)


@pytest.fixture(params=["disk", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path):
    """Two replicas' stores: separate processes' worth on disk, one Redis for both."""
    if request.param == "disk":
        url = f"file://{tmp_path / 'store'}"
    else:
        url = request.getfixturevalue("redis_url")
        with redis.Redis.from_url(url) as client:
            client.flushdb()
    with open_store(url) as first, open_store(url) as second:
        yield request.param, first.rate_buckets(), second.rate_buckets()


def test_take_is_all_or_nothing_and_charges_overdraw(stores):
    _, buckets, _ = stores
    assert buckets.take([REQUESTS, TOKENS]) is None
    buckets.charge([TOKENS], 150)  # a long answer: the balance goes below zero
    short = buckets.take([REQUESTS, TOKENS])
    assert short is not None and short.index == 1 and short.level < -49
    assert buckets.take([REQUESTS]) is None  # the refusal took nothing: the second request is still there
    short = buckets.take([REQUESTS])
    assert short is not None and short.index == 0 and short.wait(REQUESTS) > 900


def test_a_changed_limit_starts_a_full_bucket(stores):
    _, buckets, _ = stores
    assert buckets.take([REQUESTS]) is None and buckets.take([REQUESTS]) is None
    assert buckets.take([REQUESTS]) is not None
    raised = Limit(REQUESTS.name, capacity=3.0, rate=0.001, cost=1.0)
    assert [buckets.take([raised]) for _ in range(4)][:3] == [None, None, None]


def test_replicas_share_the_buckets_only_on_redis(stores):
    kind, first, second = stores
    assert first.take([REQUESTS]) is None and first.take([REQUESTS]) is None
    assert (second.take([REQUESTS]) is not None) == (kind == "redis")
    assert first.shared == second.shared == (kind == "redis")
