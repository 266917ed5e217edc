"""Where task parameters are kept: the upload format, validation, and the disk and Redis backends.

Never imports `server` or torch: the engine, the API and the clients all depend on it.
"""

from adapters_store.base import (
    TASK_ID,
    AdapterKey,
    AdapterStore,
    Artifact,
    Change,
    InvalidTaskId,
    Page,
    StoreError,
    StoreUnavailable,
    TaskInfo,
    TaskNotFound,
    TaskSummary,
    VersionInfo,
    VersionNotFound,
    Watch,
    open_store,
    redacted,
    validate_task_id,
)

__all__ = [
    "TASK_ID",
    "AdapterKey",
    "AdapterStore",
    "Artifact",
    "Change",
    "InvalidTaskId",
    "Page",
    "StoreError",
    "StoreUnavailable",
    "TaskInfo",
    "TaskNotFound",
    "TaskSummary",
    "VersionInfo",
    "VersionNotFound",
    "Watch",
    "open_store",
    "redacted",
    "validate_task_id",
]
