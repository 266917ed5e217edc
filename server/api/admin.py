"""Tenants and their API keys: create, list, revoke keys; set a tenant's grants and quotas. Bootstrap admins only."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from server.api.auth import AuthorizedRoute, RootAccess
from server.api.deps import TenantsDep
from server.api.fields import Text
from server.api.schemas import ErrorBody
from server.tenants import KeyRecord, Quota, Tenant

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=AuthorizedRoute, dependencies=[RootAccess])

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 503)}


class QuotaFields(BaseModel):
    requests_per_s: float | None = Field(default=None, gt=0, description="requests per second; null: unlimited")
    tokens_per_min: int | None = Field(default=None, gt=0, description="prompt + completion tokens per minute")


class KeyCreate(QuotaFields):
    tenant: str = Field(examples=["team-a"], description="the tenant (its namespace); created if new")
    scope: Literal["inference", "admin"] = Field(
        default="inference", description="admin: may also upload, roll back and delete tasks in its namespace"
    )
    description: Text | None = None


class KeyPublic(QuotaFields):
    id: str = Field(description="how lists and revocations name the key (the start of its SHA-256)")
    tenant: str
    scope: Literal["inference", "admin"]
    created_at: float
    description: str | None = None


class KeyCreated(KeyPublic):
    key: str = Field(description="the key itself: shown only now, stored only as a digest")


class KeyList(BaseModel):
    keys: list[KeyPublic]


class TenantUpdate(QuotaFields):
    grants: list[str] = Field(default_factory=list, description="task ids outside the namespace its keys may call")
    running: int | None = Field(default=None, gt=0, description="rows in the batch at once; null: unlimited")


class TenantPublic(TenantUpdate):
    name: str


class TenantList(BaseModel):
    tenants: list[TenantPublic]


def _key(record: KeyRecord) -> dict:
    quota = record.quota
    return {
        "id": record.id,
        "tenant": record.tenant,
        "scope": record.scope,
        "created_at": record.created_at,
        "description": record.description,
        "requests_per_s": quota.requests_per_s,
        "tokens_per_min": quota.tokens_per_min,
    }


def _tenant(tenant: Tenant) -> TenantPublic:
    return TenantPublic(name=tenant.name, grants=list(tenant.grants), **asdict(tenant.quota))


@router.post("/keys", status_code=201, response_model=KeyCreated, responses=ERRORS)
async def create_key(body: KeyCreate, tenants: TenantsDep):
    """A new API key for a tenant; the response is the only place the key appears."""
    quota = Quota(requests_per_s=body.requests_per_s, tokens_per_min=body.tokens_per_min)
    key, record = await run_in_threadpool(tenants.create_key, body.tenant, body.scope, quota, body.description)
    return KeyCreated(key=key, **_key(record))


@router.get("/keys", response_model=KeyList, responses=ERRORS)
async def list_keys(
    tenants: TenantsDep, tenant: Annotated[str | None, Query(description="only this tenant's keys")] = None
):
    """Every tenant key (never the keys themselves)."""
    records = await run_in_threadpool(tenants.keys, tenant)
    return KeyList(keys=[KeyPublic(**_key(r)) for r in records])


@router.delete("/keys/{key_id}", status_code=204, responses=ERRORS)
async def revoke_key(key_id: str, tenants: TenantsDep) -> None:
    """Revoke a key (its id, at least 8 characters of it); every replica refuses it within a second."""
    await run_in_threadpool(tenants.revoke, key_id)


@router.put("/tenants/{tenant}", response_model=TenantPublic, responses=ERRORS)
async def put_tenant(tenant: str, body: TenantUpdate, tenants: TenantsDep):
    """Create or replace a tenant's grants and quotas."""
    quota = Quota(requests_per_s=body.requests_per_s, tokens_per_min=body.tokens_per_min, running=body.running)
    return _tenant(await run_in_threadpool(tenants.put_tenant, Tenant(tenant, tuple(body.grants), quota)))


@router.get("/tenants", response_model=TenantList, responses=ERRORS)
async def list_tenants(tenants: TenantsDep):
    """Every tenant, with its grants and quotas."""
    return TenantList(tenants=[_tenant(t) for t in await run_in_threadpool(tenants.tenants)])
