"""The running batch over the paged KV pool: rows join and leave without touching anyone else's KV, a row
holds the KV it needs (no padding), shared prefixes are written once, and a row's tokens never depend on
its batch mates or on how its prompt was chunked."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft_reference import load_reference, make_adapter, tiny_llama
from serving import serve, served

from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.generation import Generation
from server.engine.request import GenerationRequest
from server.engine.residency import Residency
from server.engine.sampling import SamplingParams

KINDS = ("prefix", "prompt", "lora_qv", "ia3")
LONG = tuple(range(20, 50))
BLOCK = 4  # a small block size, so rows span several blocks


@dataclass
class Setup:
    model: torch.nn.Module
    backbone: Backbone
    residency: Residency
    dirs: dict[str, object]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama()
    backbone = Backbone(tiny_llama(), None, name="tiny")  # the same weights (seeded); hooked by the engines
    residency = Residency(backbone)
    root = tmp_path_factory.mktemp("batch-adapters")
    dirs = {kind: make_adapter(model, kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}
    for kind, path in dirs.items():
        serve(residency, kind, path)
    return Setup(model, backbone, residency, dirs)


@pytest.fixture
def engine(setup):
    engines = []

    def make(**settings) -> Engine:
        engines.append(Engine(setup.backbone, EngineSettings(kv_block_size=BLOCK, **settings), setup.residency))
        return engines[-1]

    yield make
    for e in engines:
        e.runner.hooks.remove()


def submit(engine: Engine, task: str, prompt: tuple[int, ...], new: int) -> Generation:
    request = GenerationRequest(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), task)
    return engine.submit(request, sink=lambda d: None)


def kv_of(engine: Engine, row: Generation) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values at the slots the row has written (prefix included)."""
    slots = row.kv_slots[: row.prefix_len + row.computed]
    return [engine.pool.gather(layer, slots) for layer in range(engine.backbone.geometry.num_layers)]


def test_rows_joining_and_leaving_leave_other_rows_kv_in_place(engine):
    e = engine()
    a, b = submit(e, "prefix", (12, 7, 9), 30), submit(e, "lora_qv", LONG[:9], 30)
    for _ in range(4):
        e.step()
    slots, kv = a.kv_slots.clone(), kv_of(e, a)
    c, d = submit(e, "prompt", LONG, 3), submit(e, "ia3", (5, 6), 2)  # join, then leave soon after
    for _ in range(6):
        e.step()
    assert c not in e.running and d not in e.running and a in e.running and b in e.running
    assert torch.equal(a.kv_slots[: len(slots)], slots)  # never moved
    for (k0, v0), (k1, v1) in zip(kv, kv_of(e, a)[: len(kv)]):
        assert torch.equal(k0, k1[: len(k0)]) and torch.equal(v0, v1[: len(v0)])


def test_a_row_holds_the_kv_it_needs_and_shared_prefixes_once(engine, setup):
    e = engine()
    prefix_len = served(setup.residency, "prefix").prefix_len  # 6 virtual tokens: 2 blocks of 4
    rows = [submit(e, "base", LONG, 5), submit(e, "prefix", (1, 2), 5), submit(e, "prefix", (3,), 5)]
    e.step()  # every prompt prefilled in one step (within the token budget)
    assert [r.computed for r in rows] == [30, 2, 1]
    own = sum(-(-r.computed // BLOCK) for r in rows)  # ceil: whole blocks, no padding to the longest row
    shared = -(-prefix_len // BLOCK)
    assert e.pool.capacity_blocks - e.pool.free_blocks == own + shared
    assert torch.equal(rows[1].kv_slots[:prefix_len], rows[2].kv_slots[:prefix_len])  # one copy of the prefix
    e.run_until_idle()
    assert e.pool.free_blocks == e.pool.capacity_blocks  # every block back, the prefix's too


def test_the_step_is_packed_with_each_rows_own_positions(engine, setup):
    e = engine()
    rows = [submit(e, "prompt", (44, 45, 46), 4), submit(e, "prefix", (12, 7), 4), submit(e, "base", (5,), 4)]
    e.step()
    decode = e.batch.prepare([(r, 1) for r in rows])
    assert len(decode.token_ids) == 3  # one input per row, nothing padded
    soft, prefix = served(setup.residency, "prompt").soft_len, served(setup.residency, "prefix").prefix_len
    by_row = dict(zip((r for r, _ in decode.rows), decode.positions.tolist()))
    # the next input sits where single-request PEFT puts it: after the virtual tokens and the prompt
    assert [by_row[r] for r in rows] == [soft + 3, prefix + 2, 1]


def test_a_rows_tokens_do_not_depend_on_batch_mates_or_chunking(engine, setup):
    targets = [("base", (5, 17, 33, 8, 91, 4), 10), ("prefix", (12, 7), 10), ("prompt", (44, 45, 46), 10)]
    mates = [("base", LONG, 14), ("prefix", (9,), 4), ("prompt", LONG[:20], 12), ("lora_qv", (3, 4), 2)]

    def run(waves, **settings) -> list[list[int]]:
        e = engine(**settings)
        generations = []
        for wave in waves:
            generations += [submit(e, *row) for row in wave]
            for _ in range(3):
                e.step()
        e.run_until_idle()
        return [g.output_ids for g in generations]

    alone = [run([[t]])[0] for t in targets]
    assert len({tuple(a) for a in alone}) == len(alone)  # sanity: the tasks really differ
    for waves, settings in (
        ([[*targets, *mates]], {}),
        ([mates, targets], {}),  # targets join rows already decoding
        ([[*mates[::-1], *targets]], {"max_step_tokens": 5}),  # every prompt chunked, rows at every stage
        ([targets[:1], mates, targets[1:]], {"max_step_tokens": 3}),
    ):
        outputs = run(waves, **settings)
        submitted = [row for wave in waves for row in wave]
        for target, expected in zip(targets, alone):
            assert outputs[submitted.index(target)] == expected, (target[0], waves, settings)


def test_long_rows_span_many_blocks_and_match_peft(engine, setup):
    """Teacher forcing: one cache-free PEFT forward over prompt + output checks every greedy step."""
    e = engine(max_step_tokens=7)
    specs = [("base", LONG, 40), ("prefix", (12, 7), 40), ("lora_qv", LONG[:11], 30), ("prompt", LONG[5:], 20)]
    generations = [submit(e, *spec) for spec in specs]
    e.run_until_idle()
    for (task, prompt, n), generation in zip(specs, generations):
        out = generation.output_ids
        assert len(out) == n
        reference = load_reference(setup.model, setup.dirs.get(task))
        ids = torch.tensor([list(prompt) + out[:-1]])
        with torch.inference_mode():
            logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert logits[0, -n:].argmax(-1).tolist() == out, task
