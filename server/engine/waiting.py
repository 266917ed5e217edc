"""Requests waiting for admission: one FIFO per task, admitted fairly across tasks by tokens.

Each task keeps a counter of the tokens it has been served (prompt inputs when a request is admitted,
generated tokens as they come). Admission goes to the waiting task with the lowest counter, its oldest
request first — fair queuing by virtual token counters, after VTC (Sheng et al., "Fairness in Serving
Large Language Models", 2024). A task that becomes backlogged starts from the lowest counter among the
backlogged tasks, so idle time earns no credit. The bound this gives is deficit round robin's: a task
flooding the queue with 500 requests cannot hold back a task with one for more than about one of its own
requests' worth of tokens.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping

from server.engine.generation import Generation
from server.engine.request import QueueFull


class WaitingQueue:
    """Thread-safe: `push` from any thread; the engine thread reads `order()` and commits with `admitted`."""

    def __init__(self, limit: int):
        self.limit = limit
        self._queues: dict[str, deque[Generation]] = {}  # backlogged tasks only
        self._served: dict[str, float] = {}  # tokens served per task (kept while the task has rows anywhere)
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def push(self, row: Generation) -> None:
        task = row.request.task_id
        with self._lock:
            if self._count >= self.limit:
                raise QueueFull(f"{self._count} requests are already waiting; retry later")
            queue = self._queues.get(task)
            if queue is None:
                floor = min((self._served.get(t, 0.0) for t in self._queues), default=None)
                served = self._served.get(task, 0.0)
                self._served[task] = served if floor is None else max(served, floor)
                queue = self._queues[task] = deque()
            queue.append(row)
            self._count += 1

    def order(self) -> Iterator[Generation]:
        """The waiting requests in the order fairness would admit them; reading it changes nothing."""
        with self._lock:
            queues = {task: list(q) for task, q in self._queues.items()}
            served = {task: self._served[task] for task in queues}
        heads = dict.fromkeys(queues, 0)
        while heads:
            task = min(heads, key=lambda t: (served[t], queues[t][heads[t]].arrival))
            row = queues[task][heads[task]]
            yield row
            served[task] += cost(row)
            heads[task] += 1
            if heads[task] == len(queues[task]):
                del heads[task]

    def remove(self, rows: list[Generation], *, admitted: bool) -> None:
        """Take rows out: admitted ones are charged their prompt, cancelled ones nothing."""
        with self._lock:
            for row in rows:
                task = row.request.task_id
                queue = self._queues[task]
                queue.remove(row)
                self._count -= 1
                if admitted:
                    self._served[task] += cost(row)
                if not queue:
                    del self._queues[task]

    def charge(self, tokens: Mapping[str, int]) -> None:
        """Tokens generated for running rows, by task."""
        with self._lock:
            for task, n in tokens.items():
                self._served[task] = self._served.get(task, 0.0) + n

    def forget(self, task: str) -> None:
        """The task has nothing waiting or running: its counter is no longer needed."""
        with self._lock:
            if task not in self._queues:
                self._served.pop(task, None)

    def drain(self) -> list[Generation]:
        with self._lock:
            rows = [row for queue in self._queues.values() for row in queue]
            self._queues.clear()
            self._count = 0
        return sorted(rows, key=lambda r: r.arrival)


def cost(row: Generation) -> int:
    """What admitting a row costs its task: its prompt inputs."""
    return row.prompt_inputs
