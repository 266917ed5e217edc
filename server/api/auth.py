"""API keys: an inference scope and an admin scope, sent as `Authorization: Bearer <key>` or `X-API-Key`.

The keys in the environment are global (the bootstrap admin); tenants' keys live in the store (`server/tenants.py`)
and see only their tenant's tasks.

With no key configured at all the service is open (and says so loudly at start-up). Keys are compared in constant
time, against every configured key whichever matches first, so the time taken tells nothing about which key or
which prefix was right. Both sides are hashed first so the comparison does not even leak a key's length.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from enum import IntEnum
from typing import Annotated, Any

from fastapi import Depends, Request, Response, Security
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.concurrency import run_in_threadpool

from adapters_store.buckets import Bucket
from server.api.errors import Forbidden, Unauthorized
from server.api.quotas import OverQuota
from server.config import Settings
from server.engine.request import EngineStopped
from server.tenants import Caller, Tenants

log = logging.getLogger("taskserve")

OPEN_WARNING = "no API keys set: the service is open to anyone who can reach it"

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key, in `X-API-Key`")


class Access(IntEnum):
    """What a caller may do; a higher scope includes the lower ones."""

    INFERENCE = 1
    ADMIN = 2


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """The configured keys, kept only as digests."""

    def __init__(self, inference: Iterable[SecretStr] = (), admin: Iterable[SecretStr] = ()):
        self._inference = [_digest(k.get_secret_value()) for k in inference]
        self._admin = [_digest(k.get_secret_value()) for k in admin]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        return cls(settings.api_keys, settings.admin_keys)

    @property
    def open(self) -> bool:
        return not self._inference and not self._admin

    def scope_of(self, key: str) -> Access | None:
        """The key's scope, or None for an unknown key. Every configured key is compared, in constant time."""
        given = _digest(key)
        admin = inference = False
        for known in self._admin:
            admin |= hmac.compare_digest(given, known)
        for known in self._inference:
            inference |= hmac.compare_digest(given, known)
        if admin:
            return Access.ADMIN
        return Access.INFERENCE if inference else None

    def log_mode(self) -> None:
        """One start-up line saying how the service is protected."""
        if self.open:
            log.warning(OPEN_WARNING)
        elif not self._admin:
            log.warning("no admin keys set: uploads, rollbacks and deletes are refused to every caller")
        else:
            log.info("API keys required: %d inference, %d admin", len(self._inference), len(self._admin))


class BadKeyThrottle:
    """Unknown keys per client, as a bucket of `per_minute` attempts refilling over a minute. Thread-safe.

    A client past its attempts is refused before its key is looked at (a right key too: otherwise the answer
    would tell a guesser which guess was right). At most `clients` clients are remembered, the least recent
    forgotten first, so a flood of addresses costs bounded memory.
    """

    def __init__(self, per_minute: int, clients: int = 65536):
        self._per_minute, self._clients = per_minute, clients
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, client: str) -> None:
        """429 if `client` has no attempt left."""
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None or bucket.refill(time.monotonic()) >= 1:
                return
            wait = max(1, round(bucket.wait_for(1) + 0.5))
        raise OverQuota(f"too many invalid API keys from this client: retry in {wait} s", wait, {})

    def failed(self, client: str) -> None:
        with self._lock:
            now = time.monotonic()
            bucket = self._buckets.pop(client, None) or Bucket(
                self._per_minute, self._per_minute / 60, self._per_minute, now
            )
            bucket.refill(now)
            bucket.level -= 1
            self._buckets[client] = bucket
            while len(self._buckets) > self._clients:
                self._buckets.popitem(last=False)


def authenticate(request: Request) -> Access:
    """The caller's scope from its key (once per request); 401 without a known key, unless the service is open.

    The environment's keys are the bootstrap: global, seeing every task. Any other key is looked up among the
    tenants' keys in the store (`server/tenants.py`), which may block for a store read: call it off the event loop.
    """
    caller = getattr(request.state, "caller", None)
    if caller is None:
        caller = request.state.caller = _identify(request)
    return Access.ADMIN if caller.admin else Access.INFERENCE


def _identify(request: Request) -> Caller:
    keys: KeyRing = request.app.state.keys
    if keys.open:
        return Caller(admin=True)
    key = _presented_key(request)
    if not key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    throttle: BadKeyThrottle = request.app.state.bad_keys
    client = request.client.host if request.client is not None else "unknown"
    throttle.check(client)
    scope = keys.scope_of(key)
    if scope is not None:
        return Caller(admin=scope is Access.ADMIN)
    tenants: Tenants | None = getattr(request.app.state, "tenants", None)
    if tenants is None:
        raise EngineStopped("the key store is still opening")
    record = tenants.lookup(key)
    if record is None:
        throttle.failed(client)
        raise Unauthorized("invalid API key")
    return Caller(admin=record.scope == "admin", key=record, tenant=tenants.tenant(record.tenant))


def _presented_key(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


def caller_scope(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    _header: Annotated[str | None, Security(api_key_header)],
) -> Access:
    """The caller's scope. The two security parameters put both schemes in the OpenAPI spec (Swagger's
    Authorize button); the key itself is read by `authenticate`, which `AuthorizedRoute` also calls."""
    return authenticate(request)


def current_caller(request: Request, _scope: Annotated[Access, Depends(caller_scope)]) -> Caller:
    """Who sent the request: a global caller, or a tenant's key."""
    return request.state.caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def require_inference(scope: Annotated[Access, Depends(caller_scope)]) -> None:
    """Any valid key (or an open service)."""


def require_admin(scope: Annotated[Access, Depends(caller_scope)]) -> None:
    """An admin key (or an open service); 403 for an inference key."""
    if scope < Access.ADMIN:
        raise Forbidden("this route needs an admin key; yours is an inference key")


def require_root(scope: Annotated[Access, Depends(caller_scope)], request: Request) -> None:
    """A bootstrap admin key from the environment (or an open service): tenants' own admin keys are refused."""
    if scope < Access.ADMIN or request.state.caller.key is not None:
        raise Forbidden("this route needs a bootstrap admin key (TASKSERVE_ADMIN_KEYS)")


def require_global(scope: Annotated[Access, Depends(caller_scope)], request: Request) -> None:
    """A key from the environment, inference or admin (or an open service): what shows every tenant's numbers."""
    if request.state.caller.key is not None:
        raise Forbidden(
            "this route shows every tenant's usage: it needs a key from the environment (TASKSERVE_API_KEYS or "
            "TASKSERVE_ADMIN_KEYS), not a tenant's key"
        )


InferenceAccess = Depends(require_inference)
AdminAccess = Depends(require_admin)
RootAccess = Depends(require_root)
GlobalAccess = Depends(require_global)


class AuthorizedRoute(APIRoute):
    """Checks the key before FastAPI reads the body, so an anonymous caller cannot make the server parse an upload.

    FastAPI reads and parses a request's body before it solves dependencies; this route runs the route's own
    `require_*` dependency (declared as usual, found in its dependant) first, with the request alone.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        requirement = _requirement(self.dependant)
        if requirement is None:
            return handler

        async def authorized(request: Request) -> Response:
            scope = await run_in_threadpool(authenticate, request)  # a tenant's key may need a store read
            if requirement in (require_root, require_global):
                requirement(scope, request)
            else:
                requirement(scope)
            return await handler(request)

        return authorized


def _requirement(dependant: Dependant) -> Callable[..., None] | None:
    """The strictest `require_*` among the dependant's dependencies, at any depth."""
    calls, pending = set(), [dependant]
    while pending:
        for dep in pending.pop().dependencies:
            calls.add(dep.call)
            pending.append(dep)
    for requirement in (require_root, require_admin, require_global, require_inference):
        if requirement in calls:
            return requirement
    return None
