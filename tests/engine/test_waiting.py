"""Fair admission: a task flooding the queue cannot hold back a task with one request for more than a round."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from server.engine.request import QueueFull
from server.engine.waiting import WaitingQueue

_arrivals = itertools.count()


@dataclass(eq=False)
class Row:
    task: str
    prompt_inputs: int = 10
    cancelled: bool = False
    arrival: int = field(default_factory=lambda: next(_arrivals))

    @property
    def request(self):
        return SimpleNamespace(task_id=self.task)


def names(rows) -> list[str]:
    return [r.task for r in rows]


def test_one_request_of_a_quiet_task_goes_before_a_flood():
    queue = WaitingQueue(limit=1000)
    flood = [Row("flood") for _ in range(500)]
    for row in flood:
        queue.push(row)
    queue.remove(flood[:3], admitted=True)  # the flood has been served already
    quiet = Row("quiet")
    queue.push(quiet)
    order = list(queue.order())
    assert order.index(quiet) <= 1  # at most one flood request ahead of it
    assert [r for r in order if r.task == "flood"] == flood[3:]  # first in, first out within a task


def test_tasks_take_turns_by_tokens_served():
    queue = WaitingQueue(limit=100)
    a = [Row("a", prompt_inputs=30) for _ in range(3)]
    b = [Row("b", prompt_inputs=10) for _ in range(6)]
    for row in a + b:
        queue.push(row)
    # a's requests cost three of b's: b gets about three admissions per one of a's
    assert names(queue.order()) == ["a", "b", "b", "b", "a", "b", "b", "b", "a"]


def test_generated_tokens_count_too():
    queue = WaitingQueue(limit=100)
    a, b = Row("a"), Row("b")
    queue.push(a)
    queue.push(b)
    queue.charge({"a": 25})  # a's running rows generated 25 tokens
    assert list(queue.order()) == [b, a]


def test_a_newly_backlogged_task_gets_no_credit_for_idle_time():
    queue = WaitingQueue(limit=100)
    busy = [Row("busy") for _ in range(4)]
    for row in busy:
        queue.push(row)
    queue.remove(busy[:2], admitted=True)  # busy: 20 tokens served
    queue.charge({"idle": -100})  # whatever an old counter says...
    newcomer = Row("idle")
    queue.push(newcomer)
    assert names(queue.order()) == ["busy", "idle", "busy"]  # ...it starts level with the backlog, not ahead


def test_reading_the_order_changes_nothing_and_removal_commits():
    queue = WaitingQueue(limit=3)
    rows = [Row("a"), Row("b"), Row("a")]
    for row in rows:
        queue.push(row)
    with pytest.raises(QueueFull, match="3 requests are already waiting"):
        queue.push(Row("c"))
    first = list(queue.order())
    assert list(queue.order()) == first and len(queue) == 3
    queue.remove([first[0]], admitted=True)
    queue.remove([first[1]], admitted=False)  # cancelled: no charge
    assert len(queue) == 1 and list(queue.order()) == first[2:]
    assert queue.drain() == first[2:] and not queue
