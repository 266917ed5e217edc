"""Per-step LoRA and IA³ over the slot pool: gathered == segmented == the per-row reference, rows without an
adapter get exactly the base output, a row's result does not depend on its mates, and slots are recycled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.adapters import batched
from server.engine.adapters.base import LoadedAdapter, LoraModule
from server.engine.adapters.batched import AdapterHooks, AdapterStep
from server.engine.adapters.pool import AdapterPool, family_of
from server.engine.backbone import Geometry, LinearShape

CPU = torch.device("cpu")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class Stack(nn.Module):
    """Two blocks side by side: families `layers.{}.up` and `layers.{}.down`, two layers each."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        return self.layers[0](x) + self.layers[1](x)


SHAPES = {
    f"layers.{i}.{m}": LinearShape(*shape, False)
    for i in range(2)
    for m, shape in (("up", (16, 24)), ("down", (24, 8)))
}
GEOMETRY = Geometry("stack", 2, 16, 1, 1, 16, 1, 1, linear_modules=SHAPES)


def _lora(key: str, modules: dict[str, int], seed: int, scaling: float) -> LoadedAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoadedAdapter(
        key=key,
        kind="lora",
        lora={
            name: LoraModule(
                a=torch.randn(rank, SHAPES[name].in_features, generator=g),
                b=torch.randn(SHAPES[name].out_features, rank, generator=g),
                scaling=scaling,
            )
            for name, rank in modules.items()
        },
    )


def _ia3(key: str, seed: int) -> LoadedAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoadedAdapter(
        key=key,
        kind="ia3",
        scale_in={"layers.0.up": torch.rand(16, generator=g) + 0.5},
        scale_out={"layers.1.down": torch.rand(8, generator=g) + 0.5},
    )


def _scaled_lora(key: str, seed: int) -> LoadedAdapter:
    """DoRA's form: a LoRA plus an output scale and shift on the same layer."""
    adapter = _lora(key, {"layers.0.down": 2}, seed=seed, scaling=1.0)
    g = torch.Generator().manual_seed(seed)
    adapter.scale_out["layers.0.down"] = torch.rand(8, generator=g) + 0.5
    adapter.shift_out["layers.0.down"] = torch.randn(8, generator=g)
    adapter.shift_out["layers.1.up"] = torch.randn(24, generator=g)
    return adapter


ADAPTERS = {
    "a": lambda: _lora("a@1", {"layers.0.up": 2, "layers.1.down": 3}, seed=1, scaling=2.0),
    "b": lambda: _lora("b@1", {"layers.0.up": 5, "layers.0.down": 4}, seed=2, scaling=0.5),  # higher rank
    "c": lambda: _lora("c@1", {"layers.1.down": 1}, seed=3, scaling=1.5),  # one layer, rank 1
    "d": lambda: _ia3("d@1", seed=4),
    "e": lambda: _scaled_lora("e@1", seed=5),
}


@pytest.fixture
def stack():
    torch.manual_seed(0)
    model = Stack().eval()
    pool = AdapterPool(GEOMETRY, CPU)
    hooks = AdapterHooks(model, pool)
    installed = {name: pool.install(make()) for name, make in ADAPTERS.items()}
    yield model, pool, hooks, installed
    hooks.remove()


def run(model, hooks, step, x):
    with torch.inference_mode(), hooks.active(step):
        return model(x)


ROWS = {
    "mixed": [("a", 3), (None, 2), ("b", 1), ("a", 2), ("d", 2), (None, 1), ("c", 4), ("e", 2), ("a", 1)],
    "one adapter": [("b", 2), ("b", 3), ("b", 1)],  # every token carries LoRA on layer 0: no gather
    "one row": [(None, 2), ("c", 1), (None, 3)],
}


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_gathered_and_segmented_equal_the_per_row_reference(stack, rows):
    model, pool, hooks, installed = stack
    spans = [(installed.get(name), n) for name, n in rows]
    total = sum(n for _, n in rows)
    x = torch.randn(1, total, 16, generator=torch.Generator().manual_seed(7))
    base = run(model, hooks, None, x)
    outputs = {b: run(model, hooks, AdapterStep.build(spans, pool, b), x) for b in ("gathered", "segmented", "loop")}
    start = 0
    for name, n in rows:
        rows_out = {b: out[0, start : start + n] for b, out in outputs.items()}
        if name is None:  # exactly the base model, whatever shares the step
            assert all(torch.equal(o, base[0, start : start + n]) for o in rows_out.values())
        else:  # sanity: the adapter does something
            assert not torch.allclose(rows_out["loop"], base[0, start : start + n], atol=1e-3)
            alone = run(model, hooks, AdapterStep.build([(installed[name], n)], pool, "loop"), x[:, start : start + n])
            torch.testing.assert_close(rows_out["loop"], alone[0], atol=1e-5, rtol=1e-5)  # independent of its mates
        start += n
    for b in ("gathered", "segmented"):
        torch.testing.assert_close(outputs[b], outputs["loop"], atol=1e-5, rtol=1e-5)


@pytest.fixture
def gpu_policy(monkeypatch):
    """auto's split as on a GPU (short runs gathered), to test the mechanism on this machine."""
    monkeypatch.setitem(batched.SEGMENT_MIN_TOKENS, "cpu", 4)


def test_auto_on_a_cpu_computes_every_run_segmented(stack):
    _, pool, _, installed = stack
    step = AdapterStep.build([(installed[k], 1) for k in "abcab"], pool, "auto")
    assert all(s.gathered is None and len(s.runs) >= 2 for s in step.lora.values())


def test_auto_segments_long_runs_and_gathers_short_ones(stack, gpu_policy):
    _, pool, _, installed = stack
    a, b, c = installed["a"], installed["b"], installed["c"]
    step = AdapterStep.build([(a, 40), (b, 1), (c, 1), (b, 30), (None, 2), (a, 2)], pool, "auto")
    up, down = step.lora["layers.{}.up"], step.lora["layers.{}.down"]
    slot_a, slot_b = a.slots.lora["layers.{}.up"], b.slots.lora["layers.{}.up"]
    assert up.runs == ((0, 40, slot_a), (42, 72, slot_b))  # prompt-chunk runs: matmuls on the pool's weights
    assert up.tokens.tolist() == [40, 74, 75] and up.gathered.key[1] == (slot_b, slot_a, slot_a)
    down_slots = [x.slots.lora["layers.{}.down"] for x in (a, b, c)]
    assert down.runs == ((0, 40, down_slots[0]), (42, 72, down_slots[1]))
    assert down.gathered.key[1] == (down_slots[1], down_slots[2], down_slots[0], down_slots[0])
    assert AdapterStep.build([(None, 3), (installed["d"], 1)], pool, "auto").lora == {}  # IA³ only
    assert AdapterStep.build([(None, 3)], pool, "auto") is None


def test_decode_steps_reuse_the_gathered_weights_until_a_slot_changes(stack, gpu_policy):
    _, pool, _, installed = stack
    decode = [(installed[k], 1) for k in "abcab"]
    first = AdapterStep.build(decode, pool, "auto")
    again = AdapterStep.build(decode, pool, "auto", previous=first)
    assert all(again.lora[f].gathered is first.lora[f].gathered for f in first.lora)  # nothing gathered again
    pool.install(_lora("late@1", {"layers.0.up": 2}, seed=5, scaling=1.0))  # any slot's weights change...
    after = AdapterStep.build(decode, pool, "auto", previous=again)
    assert after.lora["layers.{}.up"].gathered is not again.lora["layers.{}.up"].gathered  # ...and it is
    assert after.lora["layers.{}.down"].gathered is again.lora["layers.{}.down"].gathered


def test_each_adapter_is_held_once_and_slots_are_recycled(stack):
    model, pool, hooks, installed = stack
    x = torch.randn(1, 4, 16)
    before = run(model, hooks, AdapterStep.build([(installed["c"], 4)], pool, "gathered"), x)
    extra = [pool.install(_lora(f"e{i}@1", {"layers.1.down": 2}, seed=10 + i, scaling=1.0)) for i in range(5)]
    family = pool.lora["layers.{}.down"]
    assert family.slots.capacity >= 8  # grew past its first 4 slots; the rank stayed the largest seen (4)
    assert family.a.shape == (2, family.slots.capacity, 4, 24)
    after_growth = run(model, hooks, AdapterStep.build([(installed["c"], 4)], pool, "gathered"), x)
    assert torch.equal(before, after_growth)  # a grown pool keeps every slot's weights
    freed = extra[1].slots.lora["layers.{}.down"]
    pool.release(extra[1])
    again = pool.install(_lora("f@1", {"layers.1.down": 1}, seed=99, scaling=1.0))
    assert again.slots.lora["layers.{}.down"] == freed  # the freed slot is reused...
    # ...with nothing of its previous occupant left in the padded ranks
    fresh = AdapterPool(GEOMETRY, CPU)
    fresh_hooks = AdapterHooks(model, fresh)
    try:
        alone = fresh.install(_lora("f@1", {"layers.1.down": 1}, seed=99, scaling=1.0))
        expected = run(model, fresh_hooks, AdapterStep.build([(alone, 4)], fresh, "gathered"), x)
    finally:
        fresh_hooks.remove()
    assert torch.equal(run(model, hooks, AdapterStep.build([(again, 4)], pool, "gathered"), x), expected)
    assert again.lora == {} and again.pooled_bytes == 1 * (24 + 8) * 4  # host copies dropped; its own bytes


def test_families_group_a_layer_stack():
    assert family_of("model.layers.7.mlp.down_proj") == ("model.layers.{}.mlp.down_proj", 7)
    assert family_of("transformer.h.11.attn.c_attn") == ("transformer.h.{}.attn.c_attn", 11)
    assert family_of("lm_head") == ("lm_head", 0)
