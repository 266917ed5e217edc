"""Redis backend: every replica shares one Redis; changes are announced on a pub/sub channel.

Keys (task ids cannot contain ':', so keys never collide):

    ts:task:<id>:v:<N>:files   hash name -> bytes        immutable once committed
    ts:task:<id>:v:<N>:meta    VersionInfo JSON           immutable once committed
    ts:task:<id>:versions      sorted set of committed versions (score = member = N)
    ts:task:<id>:current       the current version number
    ts:task:<id>:next          INCR counter: distinct numbers under concurrency; kept on delete so
                               a number is never reused (caches key on task + version)
    ts:tasks                   sorted set, all scores 0: lexicographic paging with ZRANGEBYLEX
    ts:changes                 pub/sub channel, one JSON `Change` per put / set_current / delete
    ts:access:<kind>           hash record id -> JSON (tenants, keys as digests)
    ts:bucket:<name>           hash level, at, capacity, rate: a quota's token bucket, shared by every
                               replica; expires once it would be full again

A put stages the version's keys with a TTL, then one Lua script checks they are there, makes them
permanent, lists the version, flips `current`, adds the task and publishes: a reader never sees a
current pointing at missing data, and a writer that dies mid-upload leaves only keys that expire.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import redis
from redis import exceptions as rx
from redis.backoff import NoBackoff
from redis.retry import Retry

from adapters_store.base import (
    AdapterStore,
    Artifact,
    Change,
    ChangeCallback,
    Page,
    RecordKind,
    StoreUnavailable,
    TaskInfo,
    TaskNotFound,
    TaskSummary,
    VersionInfo,
    VersionNotFound,
    Watch,
    check_files,
    check_limit,
    check_record_id,
    check_version,
    content_sha256,
    redacted,
    validate_task_id,
)
from adapters_store.buckets import Buckets, Limit, Short

log = logging.getLogger(__name__)

# Errors that mean "Redis cannot serve now" rather than "the request is wrong".
_UNAVAILABLE = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.OutOfMemoryError)

# KEYS: files, meta, versions, current, tasks   ARGV: version, task_id, channel, change
_COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
redis.call('SET', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], 0, ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: current, versions, meta   ARGV: version, channel, change
_SET_CURRENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {-1} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {1, redis.call('GET', KEYS[3])}
"""


# A bucket's level now, refilled from what it held (a changed capacity or rate starts full). Redis 7 replicates a
# script's effects, so reading the clock (TIME) before writing is allowed; older servers are asked to.
_BUCKET_LEVEL = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function level_of(key, capacity, rate)
  local held = redis.call('HMGET', key, 'level', 'at', 'capacity', 'rate')
  if held[1] and held[3] == capacity and held[4] == rate then
    return math.min(tonumber(capacity), tonumber(held[1]) + math.max(0, now - tonumber(held[2])) * tonumber(rate))
  end
  return tonumber(capacity)
end
local function store(key, level, capacity, rate)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now), 'capacity', capacity, 'rate', rate)
  redis.call('PEXPIRE', key, math.ceil((tonumber(capacity) - level) / tonumber(rate) * 1000) + 1000)
end
"""

# KEYS: buckets   ARGV: capacity, rate, cost of each   ->  {0} taken, or {i, level} for the first short bucket
_TAKE = (
    _BUCKET_LEVEL
    + """
local levels = {}
for i, key in ipairs(KEYS) do
  levels[i] = level_of(key, ARGV[3 * i - 2], ARGV[3 * i - 1])
  if levels[i] < 1 then return {i, tostring(levels[i])} end
end
for i, key in ipairs(KEYS) do
  store(key, levels[i] - tonumber(ARGV[3 * i]), ARGV[3 * i - 2], ARGV[3 * i - 1])
end
return {0}
"""
)

# KEYS: buckets   ARGV: amount, then capacity, rate of each
_CHARGE = (
    _BUCKET_LEVEL
    + """
for i, key in ipairs(KEYS) do
  local capacity, rate = ARGV[2 * i], ARGV[2 * i + 1]
  store(key, level_of(key, capacity, rate) - tonumber(ARGV[1]), capacity, rate)
end
return 0
"""
)


class RedisStore(AdapterStore):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ts:",
        socket_timeout: float = 2.0,
        upload_timeout: float = 120.0,
        health_check_interval: int = 10,
        staging_ttl_s: int = 3600,
    ) -> None:
        """Short socket timeouts and a single immediate retry: a dead Redis fails fast (503) while a
        pooled connection broken by a Redis restart is silently replaced.

        Uploads go through a second pool with a long socket timeout: Python bounds a whole sendall()
        by the timeout, and one file of a large adapter is sent as one sendall(). Its connect timeout
        stays short, so a dead Redis still fails fast.
        """
        self.url = redacted(url)  # never log a password
        self._prefix = prefix
        self._channel = f"{prefix}changes"
        self._staging_ttl_s = staging_ttl_s
        common = {
            "socket_connect_timeout": socket_timeout,
            "health_check_interval": health_check_interval,
            "retry": Retry(NoBackoff(), retries=1),
            "client_name": "taskserve-store",
        }
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout, **common)
        self._uploads = redis.Redis.from_url(url, socket_timeout=max(socket_timeout, upload_timeout), **common)
        self._commit = self._client.register_script(_COMMIT)
        self._set_current = self._client.register_script(_SET_CURRENT)
        self._watches: list[Watch] = []

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    # --- keys --------------------------------------------------------------------------------------

    def _key(self, task_id: str, *parts: str | int) -> str:
        return ":".join((f"{self._prefix}task", task_id, *map(str, parts)))

    def _version_keys(self, task_id: str, version: int) -> tuple[str, str]:
        return self._key(task_id, "v", version, "files"), self._key(task_id, "v", version, "meta")

    @property
    def _tasks(self) -> str:
        return f"{self._prefix}tasks"

    # --- writes ------------------------------------------------------------------------------------

    def put(
        self,
        task_id: str,
        files: Mapping[str, bytes],
        *,
        kind: str,
        parameters: int,
        backbone: str,
        description: str | None = None,
    ) -> VersionInfo:
        validate_task_id(task_id)
        check_files(files)
        with self._unavailable():
            version = int(self._client.incr(self._key(task_id, "next")))
            info = VersionInfo(
                task_id=task_id,
                version=version,
                kind=kind,
                parameters=int(parameters),
                bytes=sum(len(data) for data in files.values()),
                sha256=content_sha256(files),
                created_at=time.time(),
                backbone=backbone,
                description=description,
            )
            files_key, meta_key = self._version_keys(task_id, version)
            stage = self._uploads.pipeline(transaction=True)
            stage.hset(files_key, mapping={name: bytes(data) for name, data in files.items()})
            stage.expire(files_key, self._staging_ttl_s)
            stage.set(meta_key, info.to_json(), ex=self._staging_ttl_s)
            stage.execute()
            committed = self._commit(
                keys=[files_key, meta_key, self._key(task_id, "versions"), self._key(task_id, "current"), self._tasks],
                args=[version, task_id, self._channel, Change(task_id, "put", version).to_json()],
            )
        if not committed:
            raise StoreUnavailable(f"the staged upload of {task_id!r} v{version} expired before it was committed")
        return info

    def set_current(self, task_id: str, version: int) -> VersionInfo:
        validate_task_id(task_id)
        check_version(task_id, version)
        with self._unavailable():
            status, *meta = self._set_current(
                keys=[
                    self._key(task_id, "current"),
                    self._key(task_id, "versions"),
                    self._version_keys(task_id, version)[1],
                ],
                args=[version, self._channel, Change(task_id, "current", version).to_json()],
            )
        if status == 0:
            raise TaskNotFound(f"unknown task {task_id!r}")
        if status == -1 or not meta or not meta[0]:
            raise VersionNotFound(f"task {task_id!r} has no version {version}")
        return VersionInfo.from_json(meta[0])

    def delete(self, task_id: str) -> None:
        validate_task_id(task_id)
        versions_key, current_key = self._key(task_id, "versions"), self._key(task_id, "current")

        def transaction(pipe: redis.client.Pipeline) -> None:
            # WATCH (by client.transaction) on both keys: a put committing meanwhile makes us retry
            if not pipe.exists(current_key):
                raise TaskNotFound(f"unknown task {task_id!r}")
            versions = [int(v) for v in pipe.zrange(versions_key, 0, -1)]
            pipe.multi()
            for version in versions:
                pipe.delete(*self._version_keys(task_id, version))
            pipe.delete(current_key, versions_key)  # not `next`: version numbers are never reused
            pipe.zrem(self._tasks, task_id)
            pipe.publish(self._channel, Change(task_id, "delete", None).to_json())

        with self._unavailable():
            self._client.transaction(transaction, versions_key, current_key)

    # --- reads -------------------------------------------------------------------------------------

    def get(self, task_id: str, version: int | None = None) -> Artifact:
        validate_task_id(task_id)
        with self._unavailable():
            if version is None:
                current = self._client.get(self._key(task_id, "current"))
                if current is None:
                    raise TaskNotFound(f"unknown task {task_id!r}")
                version = int(current)
            check_version(task_id, version)
            files_key, meta_key = self._version_keys(task_id, version)
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(self._key(task_id, "current"))
            pipe.zscore(self._key(task_id, "versions"), version)
            pipe.get(meta_key)
            pipe.hgetall(files_key)
            exists, listed, meta, files = pipe.execute()
        if not exists:
            raise TaskNotFound(f"unknown task {task_id!r}")
        if listed is None or meta is None:  # staged but uncommitted keys are not a version
            raise VersionNotFound(f"task {task_id!r} has no version {version}")
        return Artifact(info=VersionInfo.from_json(meta), files={k.decode(): v for k, v in files.items()})

    def info(self, task_id: str) -> TaskInfo:
        validate_task_id(task_id)
        with self._unavailable():
            pipe = self._client.pipeline(transaction=False)
            pipe.get(self._key(task_id, "current"))
            pipe.zrange(self._key(task_id, "versions"), 0, -1)
            current, listed = pipe.execute()
            if current is None:
                raise TaskNotFound(f"unknown task {task_id!r}")
            numbers = [int(v) for v in listed]
            metas = self._client.mget([self._version_keys(task_id, v)[1] for v in numbers]) if numbers else []
        versions = tuple(sorted((VersionInfo.from_json(m) for m in metas if m), key=lambda v: v.version))
        if not any(v.version == int(current) for v in versions):
            raise TaskNotFound(f"unknown task {task_id!r}")  # deleted while we were reading
        return TaskInfo(task_id=task_id, current=int(current), versions=versions)

    def list(self, *, after: str | None = None, limit: int = 100) -> Page:
        """Three round trips per page whatever its size: ids, their current versions, their metas."""
        check_limit(limit)
        low = "-" if after is None else "(" + after
        with self._unavailable():
            ids = [i.decode() for i in self._client.zrangebylex(self._tasks, low, "+", start=0, num=limit + 1)]
            more, ids = len(ids) > limit, ids[:limit]
            currents = self._client.mget([self._key(i, "current") for i in ids]) if ids else []
            live = [(i, int(c)) for i, c in zip(ids, currents) if c is not None]
            metas = self._client.mget([self._version_keys(i, v)[1] for i, v in live]) if live else []
        tasks = tuple(TaskSummary(task_id=i, current=VersionInfo.from_json(m)) for (i, _), m in zip(live, metas) if m)
        return Page(tasks=tasks, next_after=ids[-1] if more and ids else None)

    # --- access records ----------------------------------------------------------------------------

    def put_record(self, kind: RecordKind, record_id: str, document: Mapping[str, object]) -> None:
        with self._unavailable():
            self._client.hset(f"{self._prefix}access:{kind}", check_record_id(record_id), json.dumps(dict(document)))

    def get_record(self, kind: RecordKind, record_id: str) -> dict | None:
        with self._unavailable():
            found = self._client.hget(f"{self._prefix}access:{kind}", check_record_id(record_id))
        return None if found is None else json.loads(found)

    def list_records(self, kind: RecordKind) -> list[dict]:
        with self._unavailable():
            found = self._client.hgetall(f"{self._prefix}access:{kind}")
        return [json.loads(found[i]) for i in sorted(found)]

    def delete_record(self, kind: RecordKind, record_id: str) -> bool:
        with self._unavailable():
            return bool(self._client.hdel(f"{self._prefix}access:{kind}", check_record_id(record_id)))

    def rate_buckets(self) -> Buckets:
        """Quotas counted in Redis: every replica on this store enforces one limit together."""
        return _RedisBuckets(self)

    # --- notifications and lifecycle ---------------------------------------------------------------

    def watch(self, callback: ChangeCallback, *, on_resync: Callable[[], None] | None = None) -> Watch:
        watch = _PubSubWatch(self._client, self._channel, callback, on_resync).start()
        self._watches.append(watch)
        return watch

    def ping(self) -> None:
        with self._unavailable():
            self._client.ping()

    def close(self) -> None:
        for watch in self._watches:
            watch.close()
        self._watches.clear()
        self._client.close()
        self._uploads.close()

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"redis store {self.url} is unavailable: {e}") from e


class _RedisBuckets(Buckets):
    shared = True

    def __init__(self, store: RedisStore):
        self._store = store
        self._take = store._client.register_script(_TAKE)
        self._charge = store._client.register_script(_CHARGE)

    def _keys(self, limits: Sequence[Limit]) -> list[str]:
        return [f"{self._store._prefix}bucket:{limit.name}" for limit in limits]

    def take(self, limits: Sequence[Limit]) -> Short | None:
        args = [value for limit in limits for value in (repr(limit.capacity), repr(limit.rate), repr(limit.cost))]
        with self._store._unavailable():
            found = self._take(keys=self._keys(limits), args=args)
        return None if found[0] == 0 else Short(int(found[0]) - 1, float(found[1]))

    def charge(self, limits: Sequence[Limit], amount: float) -> None:
        args = [repr(float(amount)), *(value for limit in limits for value in (repr(limit.capacity), repr(limit.rate)))]
        with self._store._unavailable():
            self._charge(keys=self._keys(limits), args=args)


class _PubSubWatch(Watch):
    """A SUBSCRIBE on its own connection; reconnects with backoff and calls on_resync after a gap."""

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        callback: ChangeCallback,
        on_resync: Callable[[], None] | None,
        max_backoff_s: float = 2.0,
    ) -> None:
        super().__init__(f"taskserve-store-watch:{channel}", callback, on_resync)
        self._client, self._channel, self._max_backoff_s = client, channel, max_backoff_s
        self._pubsub: redis.client.PubSub | None = None
        self._subscriptions = 0
        try:
            # subscribed before watch() returns, so a change made right after it is delivered
            self._connect()
        except _UNAVAILABLE as e:
            log.warning("store watcher cannot subscribe yet (%s); retrying in the background", e)
            self._disconnect()
            self._subscriptions = 1  # so the first successful subscription counts as a gap: resync

    def _connect(self) -> None:
        self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(self._channel)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # wait for the server's confirmation
            message = self._pubsub.get_message(timeout=0.5)
            if message is not None:
                self._handle(message)
                if message["type"] == "subscribe":
                    return
        raise rx.TimeoutError("no subscribe confirmation")

    def _disconnect(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
        self._pubsub = None

    def _handle(self, message: dict) -> None:
        if message["type"] == "subscribe":
            # redis-py re-subscribes by itself after a quick reconnect: any confirmation after the
            # first means messages may have been missed
            self._subscriptions += 1
            if self._subscriptions > 1:
                log.info("store watcher re-subscribed to %s", self._channel)
                self._resync()
        elif message["type"] == "message":
            try:
                change = Change.from_json(message["data"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed change on %s: %r", self._channel, message["data"][:200])
                return
            self._deliver(change)

    def _run(self) -> None:
        backoff = 0.05
        try:
            while not self._stop.is_set():
                try:
                    if self._pubsub is None:
                        self._connect()
                    message = self._pubsub.get_message(timeout=0.2)
                    if message is not None:
                        self._handle(message)
                    backoff = 0.05
                except _UNAVAILABLE as e:
                    log.warning("store watcher lost %s (%s); reconnecting in %.2fs", self._channel, e, backoff)
                    self._disconnect()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self._max_backoff_s)
        finally:
            self._disconnect()
