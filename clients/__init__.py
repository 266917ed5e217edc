"""taskserve clients: the Python SDK (`Client`, `AsyncClient`), the `taskserve` CLI, and the trainer.

Clients speak HTTP only; they never import `server`. `adapters_store.format` is shared so that what the clients
upload is checked with the server's own file checks before it is sent.
"""

from clients.errors import (
    ConnectionLost,
    Forbidden,
    InvalidAdapter,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServerError,
    ServerUnreachable,
    StoreUnavailable,
    TaskserveError,
    TransportError,
    Unauthorized,
    Unavailable,
    UnknownTask,
    UnknownVersion,
)
from clients.models import Generation, Message, Readiness, StreamEvent, Task, TaskPage, Usage, Version
from clients.sdk import DEFAULT_URL, AsyncClient, Client, Sampling

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "Sampling",
    "Generation",
    "Message",
    "Readiness",
    "StreamEvent",
    "Task",
    "TaskPage",
    "Usage",
    "Version",
    "TaskserveError",
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "UnknownTask",
    "UnknownVersion",
    "PayloadTooLarge",
    "InvalidAdapter",
    "QueueFull",
    "Unavailable",
    "StoreUnavailable",
    "ServerError",
    "TransportError",
    "ServerUnreachable",
    "RequestTimeout",
    "ConnectionLost",
]
