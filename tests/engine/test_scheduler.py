"""`schedule` is a pure function of the waiting and running rows: a table of states and the plans they give."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.engine.scheduler import SchedulerLimits, StepPlan, reserved_blocks, schedule


@dataclass(eq=False)
class R:
    """A row or a waiting request as the scheduler sees it."""

    name: str
    pending: int  # inputs still to compute
    prefilling: bool = True
    kv_tokens: int = 32  # own KV at its longest: 2 blocks of 16
    prefix_len: int = 0
    cancelled: bool = False
    forks: int = 0  # rows it forks when its prompt is computed
    fork_kv_tokens: int = 0


def decoding(name: str) -> R:
    return R(name, pending=1, prefilling=False)


LIMITS = SchedulerLimits(max_rows=4, max_step_tokens=10, kv_blocks=8, block_size=16)

CASES = {
    # case: (waiting, running, limits) -> expected chunks (name, n) and admitted names
    "idle": ([], [], LIMITS, [], []),
    "decoding rows each compute one token": ([], [decoding("a"), decoding("b")], LIMITS, [("a", 1), ("b", 1)], []),
    "an arrival takes what the decoding rows leave": (
        [R("w", pending=30)],
        [decoding("a"), decoding("b")],
        LIMITS,
        [("a", 1), ("b", 1), ("w", 8)],
        ["w"],
    ),
    "a prefill part-way goes on before new arrivals": (
        [R("w", pending=5)],
        [decoding("a"), R("p", pending=7)],
        LIMITS,
        [("a", 1), ("p", 7), ("w", 2)],
        ["w"],
    ),
    "short prompts are admitted whole while the budget lasts": (
        [R("w1", pending=3), R("w2", pending=3), R("w3", pending=3), R("w4", pending=3)],
        [],
        LIMITS,
        [("w1", 3), ("w2", 3), ("w3", 3), ("w4", 1)],
        ["w1", "w2", "w3", "w4"],
    ),
    "decoding never stalls, even past the budget": (
        [R("w", pending=3)],
        [decoding(f"d{i}") for i in range(4)],
        SchedulerLimits(max_rows=8, max_step_tokens=3, kv_blocks=100, block_size=16),
        [("d0", 1), ("d1", 1), ("d2", 1), ("d3", 1)],
        [],
    ),
    "the row limit holds arrivals back": (
        [R("w", pending=3)],
        [decoding(f"d{i}") for i in range(4)],
        LIMITS,
        [(f"d{i}", 1) for i in range(4)],
        [],
    ),
    "the KV reservations hold arrivals back, in order": (
        [R("big", pending=2, kv_tokens=100), R("small", pending=2)],  # big needs 7 blocks; 4 are left
        [decoding("a"), decoding("b")],
        LIMITS,
        [("a", 1), ("b", 1)],
        [],
    ),
    "a prefix is reserved too": (
        [R("w", pending=2, prefix_len=40)],  # 2 + 3 blocks; 4 are left
        [decoding("a"), decoding("b")],
        LIMITS,
        [("a", 1), ("b", 1)],
        [],
    ),
    "cancelled requests are skipped, not admitted": (
        [R("gone", pending=2, cancelled=True), R("w", pending=2)],
        [],
        LIMITS,
        [("w", 2)],
        ["w"],
    ),
    "cancelled rows compute nothing": ([], [decoding("a"), R("c", 1, False, cancelled=True)], LIMITS, [("a", 1)], []),
}


@pytest.mark.parametrize(("waiting", "running", "limits", "chunks", "admitted"), CASES.values(), ids=CASES.keys())
def test_schedule(waiting, running, limits, chunks, admitted):
    before = [(r.name, r.pending) for r in waiting + running]
    plan = schedule(waiting, running, limits)
    assert [(r.name, n) for r, n in plan.chunks] == chunks
    assert [r.name for r in plan.admitted] == admitted
    assert [r.name for r in plan.skipped] == [r.name for r in waiting if r.cancelled]
    assert plan.reserved_blocks == sum(reserved_blocks(r, limits.block_size) for r in [*running, *plan.admitted])
    assert plan.reserved_blocks <= limits.kv_blocks or not plan.admitted
    assert [(r.name, r.pending) for r in waiting + running] == before  # nothing changed


def test_a_plan_restricted_to_some_rows():
    a, b, c = decoding("a"), decoding("b"), R("c", pending=4)
    plan = schedule([c], [a, b], LIMITS)
    assert [(r.name, n) for r, n in plan.only([a, c]).chunks] == [("a", 1), ("c", 4)]
    assert plan.only([]) == StepPlan()
