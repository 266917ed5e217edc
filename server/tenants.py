"""Tenants and their API keys, over the store: who a key belongs to, what it may see, what it may spend.

A tenant owns a namespace of task ids (`team-a/...`), the tasks it is granted besides, and quotas. Its keys are
kept in the store as SHA-256 digests only (a key is 32 random bytes: a fast hash is as good as a slow one here),
on disk or in Redis, so every replica knows them; the key itself is shown once, when it is created.

Lookups are cached for `CACHE_S`, so a key costs the store one read per replica at most that often, and a
revoked key stops working on every replica within that time.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from adapters_store import AdapterStore
from adapters_store.base import BASE_TASK, NAMESPACE, namespace_of, validate_task_id

CACHE_S = 0.5  # revocation reaches every replica within this
KEY_PREFIX = "tsk_"
Scope = Literal["inference", "admin"]


class UnknownKey(KeyError):
    """No such key id (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown key"


class InvalidTenant(ValueError):
    """A tenant name that is not a namespace (HTTP 400)."""


@dataclass(frozen=True)
class Quota:
    """Limits on one key or one tenant; None: unlimited."""

    requests_per_s: float | None = None
    tokens_per_min: int | None = None  # prompt and completion tokens
    running: int | None = None  # rows in the batch at once (tenants)


@dataclass(frozen=True)
class Tenant:
    name: str  # its namespace
    grants: tuple[str, ...] = ()  # task ids outside the namespace its keys may see and call
    quota: Quota = field(default_factory=Quota)

    @classmethod
    def from_record(cls, record: dict) -> Tenant:
        return cls(record["name"], tuple(record.get("grants", ())), Quota(**record.get("quota", {})))


@dataclass(frozen=True)
class KeyRecord:
    id: str  # the digest's first 12 hex digits: how lists and revocations name a key
    digest: str  # sha256 of the key, hex
    tenant: str
    scope: Scope
    quota: Quota
    created_at: float
    description: str | None = None

    @classmethod
    def from_record(cls, record: dict) -> KeyRecord:
        return cls(**{**record, "quota": Quota(**record.get("quota", {}))})


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(name: str) -> str:
    if not isinstance(name, str) or NAMESPACE.fullmatch(name) is None:
        raise InvalidTenant(f"invalid tenant {name!r}: it must match {NAMESPACE.pattern} (it names a namespace)")
    return name


class Tenants:
    """Keys and tenants in the store; `lookup` is what authentication asks on every request."""

    def __init__(self, store: AdapterStore):
        self._store = store
        self._cache: dict[tuple[str, str], tuple[float, object]] = {}  # (kind, id) -> (fetched at, record or None)
        self._lock = threading.Lock()

    # --- keys -------------------------------------------------------------------------------------

    def create_key(
        self, tenant: str, scope: Scope = "inference", quota: Quota | None = None, description: str | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key for `tenant` (created if new): (the key, shown only now; its record)."""
        check_tenant(tenant)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        hashed = digest(key)
        record = KeyRecord(
            id=hashed[:12],
            digest=hashed,
            tenant=tenant,
            scope=scope,
            quota=quota or Quota(),
            created_at=time.time(),
            description=description,
        )
        if self.tenant(tenant) is None:
            self.put_tenant(Tenant(tenant))
        self._store.put_record("keys", hashed, asdict(record))
        return key, record

    def keys(self, tenant: str | None = None) -> list[KeyRecord]:
        found = [KeyRecord.from_record(r) for r in self._store.list_records("keys")]
        return [k for k in found if tenant is None or k.tenant == tenant]

    def revoke(self, key_id: str) -> KeyRecord:
        """Remove the key whose id (or digest) starts with `key_id`; effective everywhere within `CACHE_S`."""
        matches = [k for k in self.keys() if k.digest.startswith(key_id)] if len(key_id) >= 8 else []
        if len(matches) != 1:
            raise UnknownKey(f"no key {key_id!r}" if not matches else f"{key_id!r} names several keys; give more")
        self._store.delete_record("keys", matches[0].digest)
        self._forget("keys", matches[0].digest)
        return matches[0]

    def lookup(self, key: str) -> KeyRecord | None:
        """The live record of a presented key, or None."""
        record = self._cached("keys", digest(key))
        return None if record is None else KeyRecord.from_record(record)

    # --- tenants ----------------------------------------------------------------------------------

    def put_tenant(self, tenant: Tenant) -> Tenant:
        check_tenant(tenant.name)
        for task_id in tenant.grants:
            validate_task_id(task_id)
        self._store.put_record("tenants", tenant.name, asdict(tenant))
        self._forget("tenants", tenant.name)
        return tenant

    def tenant(self, name: str) -> Tenant | None:
        record = self._cached("tenants", name)
        return None if record is None else Tenant.from_record(record)

    def tenants(self) -> list[Tenant]:
        return [Tenant.from_record(r) for r in self._store.list_records("tenants")]

    # --- the cache --------------------------------------------------------------------------------

    def _cached(self, kind: Literal["keys", "tenants"], record_id: str) -> dict | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((kind, record_id))
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]  # type: ignore[return-value]
        record = self._store.get_record(kind, record_id)
        with self._lock:
            if len(self._cache) > 100_000:  # presented garbage keys must not grow it without bound
                self._cache.clear()
            self._cache[(kind, record_id)] = (now, record)
        return record

    def _forget(self, kind: str, record_id: str) -> None:
        with self._lock:
            self._cache.pop((kind, record_id), None)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a global caller (a bootstrap key from the environment, or an open server), or a
    tenant's key."""

    admin: bool
    key: KeyRecord | None = None  # None: global
    tenant: Tenant | None = None

    @property
    def tenant_name(self) -> str | None:
        return None if self.key is None else self.key.tenant

    def sees(self, task_id: str) -> bool:
        """Whether this caller may see and call `task_id` (otherwise it is answered as if it did not exist)."""
        if self.key is None or task_id == BASE_TASK or namespace_of(task_id) == self.key.tenant:
            return True
        return self.tenant is not None and task_id in self.tenant.grants

    def writes(self, task_id: str) -> bool:
        """Whether this caller may upload, roll back or delete `task_id`: an admin, in its own namespace."""
        return self.admin and (self.key is None or namespace_of(task_id) == self.key.tenant)
