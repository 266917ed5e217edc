"""Dependencies the routes declare: the engine, the task layer, settings and metrics the app was built with."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.api.admission import Admission
from server.api.metrics import Metrics
from server.config import Settings
from server.engine.engine import Engine
from server.engine.request import EngineStopped
from server.tasks import TaskService
from server.tenants import Tenants


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineStopped("the model is still loading")
    return engine


def get_tasks(request: Request) -> TaskService:
    tasks = getattr(request.app.state, "tasks", None)
    if tasks is None:
        raise EngineStopped("the task store is still opening")
    return tasks


def get_tenants(request: Request) -> Tenants:
    tenants = getattr(request.app.state, "tenants", None)
    if tenants is None:
        raise EngineStopped("the task store is still opening")
    return tenants


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_admission(request: Request) -> Admission:
    return request.app.state.admission


EngineDep = Annotated[Engine, Depends(get_engine)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]
TenantsDep = Annotated[Tenants, Depends(get_tenants)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
