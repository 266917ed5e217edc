"""The engine loop as a user sees it: streams, bounds, admission, cancellation, hot swap, faults, finish reasons."""

from __future__ import annotations

import asyncio
import copy
import gc
import time
from dataclasses import dataclass

import pytest
import torch
from peft_reference import EOS_ID, make_adapter, peft_greedy, tiny_llama
from serving import serve

from adapters_store import AdapterKey
from server.config import EngineSettings
from server.engine import engine as engine_module
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.generation import Generation
from server.engine.request import GenerationRequest, InvalidRequest, QueueFull, TokenDelta, UnknownTask
from server.engine.sampling import SamplingParams

P0, P1, P2, P3 = (5, 17, 33, 8, 91, 4), (12, 7), tuple(range(100, 110)), (44, 45, 46)
LONG = tuple(range(20, 50))
CONTEXT = 512  # tiny_llama's max_position_embeddings
TIMEOUT = 30.0  # seconds a threaded test may wait for the engine before it is a failure


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Env:
    model: torch.nn.Module  # the untouched reference model
    backbone: Backbone  # a copy the engines hook
    dirs: dict[str, object]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    model = tiny_llama()
    root = tmp_path_factory.mktemp("engine-adapters")
    dirs = {
        "v1": make_adapter(model, "lora_qv", root / "v1", seed=1),
        "v2": make_adapter(model, "lora_qv", root / "v2", seed=2),
        "prefix": make_adapter(model, "prefix", root / "prefix", seed=3),
    }
    return Env(model, Backbone(copy.deepcopy(model), None, name="tiny"), dirs)


@pytest.fixture
def make_engine(env):
    """make_engine(**settings) -> an engine with tasks "lora" (v1) and "prefix"; stopped and unhooked after."""
    engines: list[Engine] = []

    def make(**settings) -> Engine:
        engine = Engine(env.backbone, EngineSettings(**settings))
        serve(engine.residency, "lora", env.dirs["v1"])
        serve(engine.residency, "prefix", env.dirs["prefix"])
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
        engine.runner.hooks.remove()


def req(prompt, task: str = "base", **sampling) -> GenerationRequest:
    sampling.setdefault("max_new_tokens", 10)
    return GenerationRequest(tuple(prompt), SamplingParams(**sampling), task_id=task)


class Sink(list):
    """Collects one request's deltas."""

    def __call__(self, delta: TokenDelta) -> None:
        self.append(delta)

    @property
    def tokens(self) -> list[int]:
        return [t for d in self for t in d.token_ids]

    @property
    def finals(self) -> list[TokenDelta]:
        return [d for d in self if d.finish_reason is not None]


def run(engine: Engine, requests: list[GenerationRequest], steps: int = 0) -> list[list[int]]:
    """Submit all, step `steps` times, then run to the end; every request's tokens."""
    generations = [engine.submit(r, Sink()) for r in requests]
    for _ in range(steps):
        engine.step()
    engine.run_until_idle()
    return [g.output_ids for g in generations]


# --- streams ---------------------------------------------------------------------------------------


async def test_concurrent_streams_deliver_deltas_and_usage(make_engine):
    requests = [req(P0), req(P1, "lora", max_new_tokens=7), req(LONG, "prefix", max_new_tokens=5)]
    expected = run(make_engine(), requests)
    engine = make_engine().start()

    async def collect(request: GenerationRequest) -> list[TokenDelta]:
        return [delta async for delta in engine.generate(request)]

    streams = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in requests)), TIMEOUT)
    for request, deltas, tokens, version in zip(
        requests, streams, expected, (None, AdapterKey("lora", 1), AdapterKey("prefix", 1))
    ):
        *body, last = deltas
        assert all(d.finish_reason is None for d in body)
        assert last.finish_reason == "length"
        assert all(len(d.token_ids) == 1 and d.text == "" and d.task_version == version for d in deltas)
        assert [t for d in deltas for t in d.token_ids] == tokens
        assert (last.prompt_tokens, last.completion_tokens) == (len(request.prompt_ids), len(tokens))
        assert [d.completion_tokens for d in deltas] == list(range(1, len(tokens) + 1))


# --- bounds ----------------------------------------------------------------------------------------


def test_a_full_queue_refuses_and_the_running_batch_is_unaffected(make_engine):
    running = [req(P0, max_new_tokens=12), req(P1, "lora", max_new_tokens=12)]
    expected = run(make_engine(max_batch_size=2), running, steps=2)
    engine = make_engine(max_batch_size=2, max_queue=2)
    generations = [engine.submit(r, Sink()) for r in running]
    engine.step()
    engine.step()
    queued = [engine.submit(req(P3, max_new_tokens=3), Sink()) for _ in range(2)]  # no free row: they wait
    rejected = Sink()
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit(req(P2), rejected)
    assert len(engine.waiting) == 2
    engine.run_until_idle()
    assert [g.output_ids for g in generations] == expected
    assert [len(g.output_ids) for g in queued] == [3, 3]
    assert rejected == []


LONG_PROMPT = tuple(3 + i % 250 for i in range(500))
BAD_REQUESTS = [
    (req(LONG_PROMPT, max_new_tokens=20), InvalidRequest, r"500 tokens.*20.*exceeds the context length of 512"),
    (req(LONG_PROMPT, "prefix", max_new_tokens=8), InvalidRequest, r"500 tokens \+ 6 virtual.*context length"),
    (req(LONG_PROMPT[:300], max_new_tokens=10), InvalidRequest, r"needs 310 KV columns; the server holds 300"),
    (req(P0, max_new_tokens=33), InvalidRequest, r"max_new_tokens=33 exceeds this server's limit of 32"),
    (req(()), InvalidRequest, "the prompt is empty"),
    (req((5, 256)), InvalidRequest, r"prompt: token ids must lie in \[0, 256\)"),
    (req((-1, 5)), InvalidRequest, r"prompt: token ids must lie in \[0, 256\)"),
    (req(P0, "no-such-task"), UnknownTask, "no-such-task"),
]


def test_bad_requests_are_refused_and_running_rows_are_unaffected(make_engine):
    settings = {"max_new_tokens": 32, "max_kv_tokens": 300}
    running = [req(P0, max_new_tokens=12), req(P2, "prefix", max_new_tokens=12)]
    expected = run(make_engine(**settings), running, steps=2)
    engine = make_engine(**settings)
    generations = [engine.submit(r, Sink()) for r in running]
    engine.step()
    engine.step()
    for request, error, message in BAD_REQUESTS:
        sink = Sink()
        with pytest.raises(error, match=message):
            engine.submit(request, sink)
        assert sink == [] and not engine.waiting
    engine.run_until_idle()
    assert [g.output_ids for g in generations] == expected


def test_admission_respects_the_row_and_kv_budgets(make_engine, monkeypatch):
    short, long = (P3, 6), (tuple(range(60, 74)), 12)  # a long row reserves 14 + 12 = 26 columns: 2 blocks of 16
    requests = [req(p, task, max_new_tokens=n) for (p, n), task in zip([short, long] * 4, ["base", "lora"] * 4)]
    expected = run(make_engine(), requests)
    max_rows, max_kv = 3, 64  # 4 blocks: short (1) + long (2) + short (1) fit; two longs and a short do not
    engine = make_engine(max_batch_size=max_rows, max_kv_tokens=max_kv)
    plans, held_back = [], []
    schedule = engine_module.schedule

    def spy(waiting, running, limits):
        plan = schedule(waiting, running, limits)
        plans.append(plan)
        if waiting and not plan.admitted and len(running) < max_rows:
            held_back.append(plan)  # only the KV reservations stop it
        return plan

    monkeypatch.setattr(engine_module, "schedule", spy)
    generations = [engine.submit(r, Sink()) for r in requests]
    rows_seen = []
    while engine.running or engine.waiting:
        engine.step()
        rows_seen.append(len(engine.running))
        assert len(engine.running) <= max_rows
        assert engine.pool.capacity_blocks - engine.pool.free_blocks <= plans[-1].reserved_blocks <= 4
    assert max(rows_seen) == max_rows and held_back  # both budgets did bind
    assert [g.output_ids for g in generations] == expected


# --- cancellation ----------------------------------------------------------------------------------


def test_cancelling_a_running_row(make_engine):
    requests = [req(P0, max_new_tokens=16), req(P1, "lora", max_new_tokens=16), req(P2, "prefix", max_new_tokens=16)]
    expected = run(make_engine(), requests)
    engine = make_engine()
    sinks = [Sink() for _ in requests]
    generations = [engine.submit(r, s) for r, s in zip(requests, sinks)]
    for _ in range(3):
        engine.step()
    assert len(engine.running) == 3
    generations[1].cancel()
    waiting = Sink()
    engine.submit(req(P3), waiting).cancel()  # cancelled before it was ever admitted
    engine.step()
    assert len(engine.running) == 2 and generations[1] not in engine.running
    last = sinks[1][-1]
    assert (last.finish_reason, last.token_ids, last.completion_tokens) == ("cancelled", [], 3)
    assert [(d.finish_reason, d.token_ids) for d in waiting] == [("cancelled", [])]
    engine.run_until_idle()
    assert len(sinks[1].finals) == 1 and sinks[1][-1] is last  # nothing after the end
    assert [generations[0].output_ids, generations[2].output_ids] == [expected[0], expected[2]]


async def test_leaving_the_stream_early_cancels_the_row(make_engine):
    expected = run(make_engine(), [req(P0, max_new_tokens=12)])[0]
    engine = make_engine()
    generations: dict[str, Generation] = {}
    submit, forward = engine.submit, engine.runner.forward

    def spy_submit(request, sink, lease=None, choices=()):
        generations[request.request_id] = submit(request, sink, lease, choices)
        return generations[request.request_id]

    def slow_forward(inputs, *rest):
        time.sleep(0.002)  # the long row cannot finish its 400 tokens before we leave
        return forward(inputs, *rest)

    engine.submit, engine.runner.forward = spy_submit, slow_forward
    engine.start()
    leaver, stayer = req(P1, "lora", max_new_tokens=400, ignore_eos=True), req(P0, max_new_tokens=12)
    other = asyncio.ensure_future(_tokens(engine, stayer))
    seen = 0
    async for _ in engine.generate(leaver):
        seen += 1
        if seen == 3:
            break
    gone = generations[leaver.request_id]
    deadline = time.monotonic() + TIMEOUT
    while gone in engine.running and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert gone.cancelled and gone not in engine.running
    assert len(gone.output_ids) < 400
    assert await asyncio.wait_for(other, TIMEOUT) == expected


async def _tokens(engine: Engine, request: GenerationRequest) -> list[int]:
    return [t async for delta in engine.generate(request) for t in delta.token_ids]


# --- hot swap --------------------------------------------------------------------------------------


def test_hot_swap_keeps_running_rows_on_their_version(env, make_engine):
    engine = make_engine()
    old_sink, new_sink = Sink(), Sink()
    old = engine.submit(req(P0, "lora", max_new_tokens=12), old_sink)
    for _ in range(3):
        engine.step()
    assert serve(engine.residency, "lora", env.dirs["v2"]).key == AdapterKey("lora", 2)
    new = engine.submit(req(P0, "lora", max_new_tokens=12), new_sink)
    engine.run_until_idle()
    v1, v2 = (peft_greedy(env.model, env.dirs[v], list(P0), 12) for v in ("v1", "v2"))
    assert v1 != v2  # sanity: the versions disagree on this prompt
    assert old.output_ids == v1 and new.output_ids == v2
    assert {d.task_version for d in old_sink} == {AdapterKey("lora", 1)}
    assert {d.task_version for d in new_sink} == {AdapterKey("lora", 2)}


# --- sampling --------------------------------------------------------------------------------------


def test_seeded_sampling_ignores_batch_mates(make_engine):
    def sampled(seed: int, prompt=P0, task="lora") -> GenerationRequest:
        return req(prompt, task, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=seed, ignore_eos=True)

    target = sampled(7)
    alone = run(make_engine(), [target])[0]
    assert alone != run(make_engine(), [sampled(8)])[0]  # sanity: the seed matters
    assert alone != run(make_engine(), [req(P0, "lora", max_new_tokens=16, ignore_eos=True)])[0]  # and it samples
    mates = [req(LONG, max_new_tokens=20), sampled(8, P2, "prefix"), req(P1, "lora", max_new_tokens=3), sampled(9)]
    for layout in ([target, *mates], [*mates, target]):
        outputs = run(make_engine(), layout)
        assert outputs[layout.index(target)] == alone
    engine = make_engine()  # the target joins a batch that is already running
    generations = [engine.submit(r, Sink()) for r in mates]
    engine.step()
    engine.step()
    late = engine.submit(target, Sink())
    engine.run_until_idle()
    assert late.output_ids == alone and generations[-1].output_ids != alone


# --- faults ----------------------------------------------------------------------------------------


def _poison(engine: Engine, fails) -> list[int]:
    """Make the forward raise whenever `fails(inputs)`; returns how many forwards ran."""
    forward, calls = engine.runner.forward, []

    def faulty(inputs, *rest):
        calls.append(1)
        if fails(inputs):
            raise RuntimeError("injected fault")
        return forward(inputs, *rest)

    engine.runner.forward = faulty
    return calls


def _ends(sink: Sink) -> list[tuple[str, str | None]]:
    return [(d.finish_reason, d.error) for d in sink.finals]


def test_a_decode_fault_ends_only_the_row_it_comes_from(make_engine):
    requests = [req(P0, max_new_tokens=12), req(P1, "prefix", max_new_tokens=12), req(P2, "lora", max_new_tokens=12)]
    expected = run(make_engine(), requests)
    engine = make_engine()
    sinks = [Sink() for _ in requests]
    rows = [engine.submit(r, s) for r, s in zip(requests, sinks)]
    bad = rows[2]
    _poison(engine, lambda inputs: any(r is bad for r, _ in inputs.rows) and len(bad.output_ids) >= 3)
    engine.run_until_idle()
    assert [g.output_ids for g in rows[:2]] == expected[:2]  # the others ran on with the right tokens
    assert bad.output_ids == expected[2][:3] and sinks[2].tokens == expected[2][:3]
    assert _ends(sinks[2]) == [("error", "RuntimeError: injected fault")]
    assert [_ends(s) for s in sinks[:2]] == [[("length", None)], [("length", None)]]
    engine.start()  # and the engine goes on serving
    assert engine.complete(req(P2, "lora", max_new_tokens=12), timeout=TIMEOUT).token_ids == expected[2]


def test_a_prefill_fault_ends_only_the_rows_being_prefilled(make_engine):
    running, arriving = [req(P0, max_new_tokens=12), req(P1, "lora", max_new_tokens=12)], req(LONG, "prefix")
    expected = run(make_engine(), running)
    engine = make_engine(max_step_tokens=8)  # the long prompt is prefilled in chunks beside the decoding rows
    sinks = [Sink(), Sink()]
    rows = [engine.submit(r, s) for r, s in zip(running, sinks)]
    engine.step()
    arrival_sink = Sink()
    arrival = engine.submit(arriving, arrival_sink)
    _poison(engine, lambda inputs: any(r is arrival for r, _ in inputs.rows) and arrival.computed >= 16)
    engine.run_until_idle()
    assert arrival.output_ids == [] and _ends(arrival_sink) == [("error", "RuntimeError: injected fault")]
    assert [g.output_ids for g in rows] == expected


def test_a_row_that_cannot_join_ends_alone(make_engine):
    requests = [req(P0, max_new_tokens=8), req(P2, "lora", max_new_tokens=8)]
    expected = run(make_engine(), requests)
    engine = make_engine()
    add = engine.batch.add

    def faulty_add(row):
        if row.request.task_id == "prefix":
            raise RuntimeError("no room for the prefix")
        add(row)

    engine.batch.add = faulty_add
    sinks = [Sink(), Sink(), Sink()]
    rows = [engine.submit(r, s) for r, s in zip([requests[0], req(P1, "prefix"), requests[1]], sinks)]
    engine.run_until_idle()
    assert _ends(sinks[1]) == [("error", "RuntimeError: no room for the prefix")] and rows[1].output_ids == []
    assert [rows[0].output_ids, rows[2].output_ids] == expected


def test_a_passing_fault_costs_a_retry_not_rows(make_engine):
    requests = [req(P0, max_new_tokens=8), req(P1, "prefix", max_new_tokens=8), req(P2, "lora", max_new_tokens=8)]
    expected = run(make_engine(), requests)
    engine = make_engine()
    sinks = [Sink() for _ in requests]
    rows = [engine.submit(r, s) for r, s in zip(requests, sinks)]
    calls = _poison(engine, lambda inputs: len(calls) == 3)  # the second decode step fails once
    engine.start()
    for sink in sinks:
        deadline = time.monotonic() + TIMEOUT
        while not sink.finals and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [g.output_ids for g in rows] == expected
    assert all(_ends(s) == [("length", None)] for s in sinks)


# --- finish reasons --------------------------------------------------------------------------------


def _eos_prompt(engine: Engine) -> tuple[tuple[int, ...], list[int]]:
    """A base prompt whose greedy output reaches EOS after a few tokens, found with the engine."""
    candidates = [(p, 9) for p in range(3, 40)]
    outputs = run(engine, [req(c, max_new_tokens=8) for c in candidates])
    prompt, tokens = next((c, out) for c, out in zip(candidates, outputs) if EOS_ID in out[1:])
    return prompt, tokens


def test_finish_reasons_length_stop_and_ignore_eos(env, make_engine):
    engine = make_engine()
    prompt, tokens = _eos_prompt(engine)
    assert tokens == peft_greedy(env.model, None, list(prompt), 8)  # EOS is really the model's choice
    stop, ignore, length = Sink(), Sink(), Sink()
    engine.submit(req(prompt, max_new_tokens=8), stop)
    engine.submit(req(prompt, max_new_tokens=8, ignore_eos=True), ignore)
    engine.submit(req(P0, max_new_tokens=5, ignore_eos=True), length)
    engine.run_until_idle()
    assert stop.finals[-1].finish_reason == "stop" and stop.tokens == tokens and tokens[-1] == EOS_ID
    assert ignore.finals[-1].finish_reason == "length"
    assert len(ignore.tokens) == 8 and ignore.tokens[: len(tokens)] == tokens  # went on past EOS
    assert length.finals[-1].finish_reason == "length" and length.finals[-1].completion_tokens == 5
    assert all(len(s.finals) == 1 for s in (stop, ignore, length))


# --- known engine bugs -----------------------------------------------------------------------------


def test_a_request_that_finishes_at_its_first_token_alone(make_engine):
    engine = make_engine()
    sink = Sink()
    engine.submit(req(P0, max_new_tokens=1), sink)
    engine.run_until_idle()
    assert [d.finish_reason for d in sink] == ["length"] and not engine.running


def test_stopping_the_engine_ends_waiting_streams(make_engine):
    engine = make_engine(max_batch_size=1)
    running, waiting = Sink(), Sink()
    engine.submit(req(P0, max_new_tokens=20), running)
    engine.submit(req(P1, max_new_tokens=20), waiting)
    engine.step()  # the first row runs, the second waits for a free row
    engine.stop()
    assert [d.finish_reason for d in running.finals] == ["error"]
    assert [d.finish_reason for d in waiting.finals] == ["error"]


async def test_dropping_an_unread_stream_cancels_the_row(make_engine):
    engine = make_engine()
    generations: list[Generation] = []
    submit = engine.submit

    def spy_submit(request, sink, lease=None, choices=()):
        generations.append(submit(request, sink, lease, choices))
        return generations[-1]

    engine.submit = spy_submit
    engine.start()
    stream = engine.generate(req(P0, max_new_tokens=400, ignore_eos=True))
    del stream  # e.g. the HTTP client went away before the first chunk
    gc.collect()
    deadline = time.monotonic() + TIMEOUT
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert all(g.cancelled and len(g.output_ids) < 400 for g in generations)
