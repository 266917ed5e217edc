"""When each task last started a generation on this replica: the console's "last use".

Kept apart from the Prometheus metrics, whose labels never take a task id. Bounded: past `limit` tasks the one
used longest ago is forgotten. Per process, like residency: behind the task-affine proxy a task's requests reach
one replica, whose record is the one that matters.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class LastUse:
    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._used: OrderedDict[str, float] = OrderedDict()  # least recent first
        self._lock = threading.Lock()

    def touch(self, task_id: str) -> None:
        with self._lock:
            self._used[task_id] = time.time()
            self._used.move_to_end(task_id)
            if len(self._used) > self._limit:
                self._used.popitem(last=False)

    def get(self, task_id: str) -> float | None:
        """Unix seconds of the task's last generation here, or None if it has had none since start."""
        with self._lock:
            return self._used.get(task_id)
