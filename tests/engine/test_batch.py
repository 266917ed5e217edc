"""Batch reshaping keeps every row's KV, positions and logits; a row's tokens ignore its batch-mates."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft_reference import load_reference, make_adapter, tiny_llama

from server.config import EngineSettings
from server.engine.adapters import LoadedAdapter, read_peft_dir
from server.engine.backbone import Backbone
from server.engine.batch import Batch
from server.engine.kv_cache import HEADROOM
from server.engine.request import GenerationRequest
from server.engine.residency import Residency
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Engine

KINDS = ("prefix", "prompt", "lora_qv", "ia3")
LONG = tuple(range(20, 50))  # a long base prompt: the widest row of a batch, left-pads everybody else


@dataclass
class Row:
    prompt_ids: tuple[int, ...]
    adapter: LoadedAdapter | None


@dataclass
class Setup:
    model: torch.nn.Module
    backbone: Backbone
    residency: Residency
    runner: ModelRunner
    dirs: dict[str, object]

    def rows(self, *specs: tuple[str, tuple[int, ...]]) -> list[Row]:
        return [Row(prompt, self.residency.get(task)) for task, prompt in specs]


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
    backbone = Backbone(model, None, name="tiny")
    residency = Residency(backbone)
    root = tmp_path_factory.mktemp("batch-adapters")
    dirs = {kind: make_adapter(model, kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}
    for kind, path in dirs.items():
        residency.register(kind, *read_peft_dir(path))
    runner = ModelRunner(backbone)
    yield Setup(model, backbone, residency, runner, dirs)
    runner.hooks.remove()


# five kinds, prompts of different lengths; the prefix and soft-prompt rows add padding of their own
SPECS = [
    ("base", (5, 17, 33, 8, 91, 4)),
    ("prefix", (12, 7)),
    ("lora_qv", tuple(range(100, 110))),
    ("prompt", (44, 45, 46)),
    ("ia3", (60, 61, 62, 63, 64)),
    ("base", tuple(range(1, 15))),
]


@torch.inference_mode()  # as in Engine.step
def prefill(setup: Setup, rows: list[Row]) -> tuple[Batch, torch.Tensor]:
    batch, logits = Batch.prefill(rows, setup.runner)
    batch.next_tokens = logits.argmax(-1)
    return batch, logits


@torch.inference_mode()
def decode(setup: Setup, batch: Batch, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step; the batch then feeds `tokens` (default: its own argmax)."""
    logits = batch.decode(setup.runner)
    batch.next_tokens = logits.argmax(-1) if tokens is None else tokens
    return logits


def valid_kv(batch: Batch, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row i's keys and values at its attention-mask-1 columns, per layer."""
    n = batch.length
    cols = batch.attention_mask[i, :n].bool()
    return [(layer.keys[i][:, :n][:, cols], layer.values[i][:, :n][:, cols]) for layer in batch.kv.layers]


def span(batch: Batch, i: int) -> int:
    """Columns from row i's first valid column to the end of the batch."""
    cols = batch.attention_mask[i, : batch.length].nonzero()
    return batch.length - int(cols[0])


def assert_row_kept(before: Batch, i: int, after: Batch, j: int) -> None:
    assert before.rows[i] is after.rows[j]
    for (k0, v0), (k1, v1) in zip(valid_kv(before, i), valid_kv(after, j), strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1), (i, j)
    assert span(before, i) == span(after, j)
    assert int(after.attention_mask[j, after.length - 1]) == 1  # every row ends at the batch's last column
    assert int(before.next_positions[i]) == int(after.next_positions[j])
    assert int(before.next_tokens[i]) == int(after.next_tokens[j])


def test_filter_keeps_rows_kv_and_drops_leading_padding(setup):
    batch, _ = prefill(setup, setup.rows(*SPECS))
    for _ in range(2):
        decode(setup, batch)
    spans = [span(batch, i) for i in range(len(batch))]
    assert max(spans) == batch.length

    for keep in ([0, 2, 3, 5], [4, 1, 0], [3]):
        kept = batch.filter(keep)
        assert len(kept) == len(keep)
        for j, i in enumerate(keep):
            assert_row_kept(batch, i, kept, j)
        assert kept.length == max(spans[i] for i in keep)
        assert bool(kept.attention_mask[:, 0].any())  # no leading all-padding column survives

    shorter = [i for i, s in enumerate(spans) if s < max(spans)]
    assert shorter and len(shorter) < len(batch)
    assert batch.filter(shorter).length < batch.length  # the longest rows left: the batch shrinks


def test_concatenate_right_aligns_and_filter_restores(setup):
    first, _ = prefill(setup, setup.rows(*SPECS[:2]))
    for _ in range(3):
        decode(setup, first)
    second, _ = prefill(setup, setup.rows(*SPECS[2:]))
    assert first.length != second.length

    both = Batch.concatenate([first, second])
    assert len(both) == len(first) + len(second)
    assert both.length == max(first.length, second.length)
    for part, offset in ((first, 0), (second, len(first))):
        for i in range(len(part)):
            assert_row_kept(part, i, both, offset + i)

    for part, offset in ((first, 0), (second, len(first))):
        restored = both.filter(range(offset, offset + len(part)))
        assert restored.length == part.length
        assert torch.equal(restored.attention_mask[:, : part.length], part.attention_mask[:, : part.length])
        for i in range(len(part)):
            assert_row_kept(part, i, restored, i)


def test_decode_after_filter_gives_the_same_logits(setup):
    whole, _ = prefill(setup, setup.rows(*SPECS))
    decode(setup, whole)
    keep = [0, 3, 4]  # the long rows and the prefix row leave: the kept rows lose their left padding
    part = whole.filter(keep)
    assert part.length < whole.length
    for _ in range(4):
        expected = decode(setup, whole)
        got = decode(setup, part, tokens=whole.next_tokens[keep])
        torch.testing.assert_close(got, expected[keep], atol=1e-5, rtol=0)


def test_decode_after_concatenate_gives_the_same_logits(setup):
    first, _ = prefill(setup, setup.rows(*SPECS[3:]))
    for _ in range(2):
        decode(setup, first)
    second, _ = prefill(setup, setup.rows(*SPECS[:3]))
    both = Batch.concatenate([first, second])
    for step in range(4):
        expected = torch.cat([decode(setup, first), decode(setup, second)])
        got = decode(setup, both, tokens=torch.cat([first.next_tokens, second.next_tokens]))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        if step == 1:  # reshape again mid-flight: drop a row of each part
            both = both.filter([0, 2, 3, 5])
            first, second = first.filter([0, 2]), second.filter([0, 2])


# --- through the engine ----------------------------------------------------------------------------


def submit(engine: Engine, task: str, prompt: tuple[int, ...], new: int):
    request = GenerationRequest(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), task)
    return engine.submit(request, sink=lambda d: None)


def run(setup: Setup, waves: list[list[tuple[str, tuple[int, ...], int]]], steps_between: int = 3) -> list[list[int]]:
    """Submit each wave of (task, prompt, new tokens), a few steps apart; every row's output tokens."""
    engine = Engine(setup.backbone, EngineSettings(), residency=setup.residency)
    try:
        generations = []
        for wave in waves:
            generations += [submit(engine, *row) for row in wave]
            for _ in range(steps_between):
                engine.step()
        engine.run_until_idle()
        return [g.output_ids for g in generations]
    finally:
        engine.runner.hooks.remove()


def test_a_rows_tokens_do_not_depend_on_its_batch_mates(setup):
    targets = [("base", SPECS[0][1], 10), ("prefix", SPECS[1][1], 10), ("prompt", SPECS[3][1], 10)]
    alone = [run(setup, [[t]])[0] for t in targets]
    assert len({tuple(a) for a in alone}) == len(alone)  # sanity: the tasks really differ
    mates = [
        ("base", LONG, 14),
        ("prefix", (9,), 4),  # leaves early: the batch is filtered under the targets
        ("prompt", LONG[:20], 12),
        ("lora_qv", (3, 4, 5, 6), 2),
        ("ia3", LONG[:7], 16),
    ]
    for layout in (
        [[*targets, *mates]],  # one prefill, mates after the targets
        [[*mates[::-1], *targets]],  # one prefill, mates first
        [targets, mates[:2], mates[2:]],  # mates join a running batch twice
        [mates, targets],  # targets join a running batch of long rows
    ):
        outputs = run(setup, layout)
        submitted = [row for wave in layout for row in wave]
        for target, expected in zip(targets, alone):
            assert outputs[submitted.index(target)] == expected, (target[0], layout)


def test_kv_growth_past_the_headroom_keeps_results(setup):
    new = HEADROOM + 12
    rows = [("base", SPECS[0][1], new), ("prefix", SPECS[1][1], new), ("lora_qv", SPECS[2][1], new)]
    late = ("ia3", SPECS[4][1], 8)  # joins the batch after it has regrown
    engine = Engine(setup.backbone, EngineSettings(), residency=setup.residency)
    try:
        generations = [submit(engine, *row) for row in rows]
        engine.step()
        grown_in_place = False
        for step in range(HEADROOM + 4):
            batch, capacity = engine.running, engine.running.kv.capacity
            engine.step()
            grown_in_place |= engine.running is batch and engine.running.kv.capacity > capacity
            if step == HEADROOM:
                generations.append(submit(engine, *late))
        engine.run_until_idle()
    finally:
        engine.runner.hooks.remove()
    assert grown_in_place  # a decode step wrote past the preallocated buffers
    for (task, prompt, n), generation in zip([*rows, late], generations):
        out = generation.output_ids
        assert len(out) == n
        # teacher forcing: one cache-free PEFT forward over prompt + output checks every greedy step at once
        reference = load_reference(setup.model, setup.dirs.get(task))
        ids = torch.tensor([list(prompt) + out[:-1]])
        with torch.inference_mode():
            logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert logits[0, -n:].argmax(-1).tolist() == out, task
