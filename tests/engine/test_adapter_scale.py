"""A request's adapter_scale weights its task's per-layer delta, per row, inside a mixed batch."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
from peft import PeftModel
from peft_reference import _greedy, make_adapter, make_composite, peft_greedy, tiny_llama
from safetensors.torch import load_file, save_file
from test_parity import PROMPTS, make_engine, request

from server.engine.request import InvalidRequest

NEW_TOKENS = 10
PER_LAYER = ("lora_all", "ia3", "dora", "lora_bias", "adalora", "vera", "loha", "lokr", "composite_dora_vera")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama()
    root = tmp_path_factory.mktemp("scaled")
    dirs = {kind: make_adapter(model, kind, root / kind, seed=i) for i, kind in enumerate(PER_LAYER[:-1])}
    dirs["composite_dora_vera"] = make_composite(model, "composite_dora_vera", root / "dora_vera", seed=7)
    dirs["composite_mam"] = make_composite(model, "composite_mam", root / "mam", seed=9)
    dirs["prefix"] = dirs["composite_mam"] / "prefix"
    return model, dirs


def _scaled(prompt, task, scale):
    return replace(request(prompt, task, NEW_TOKENS), adapter_scale=scale)


@pytest.mark.parametrize("backend", ["auto", "gathered"])
def test_scale_zero_is_the_backbone_and_scale_one_is_peft_in_one_mixed_batch(setup, backend):
    model, dirs = setup
    engine = make_engine(model, dirs, lora_backend=backend)
    base = [peft_greedy(model, None, p, NEW_TOKENS) for p in PROMPTS]
    jobs = {}
    for i, prompt in enumerate(PROMPTS):  # each prompt's rows join a batch already decoding the previous ones
        for kind in PER_LAYER:
            jobs[(kind, i, 0.0)] = engine.submit(_scaled(prompt, kind, 0.0), sink=lambda d: None)
            jobs[(kind, i, 1.0)] = engine.submit(_scaled(prompt, kind, 1.0), sink=lambda d: None)
        jobs[("composite_mam", i, 0.0)] = engine.submit(_scaled(prompt, "composite_mam", 0.0), sink=lambda d: None)
        engine.step()
    engine.run_until_idle()
    for (kind, i, scale), generation in jobs.items():
        if kind == "composite_mam":  # the prefix stays; only the LoRA half is scaled away
            assert generation.output_ids == peft_greedy(model, dirs["prefix"], PROMPTS[i], NEW_TOKENS), (kind, i)
        elif scale == 0.0:
            assert generation.output_ids == base[i], (kind, i)
        else:
            assert generation.output_ids == peft_greedy(model, dirs[kind], PROMPTS[i], NEW_TOKENS), (kind, i)
    assert any(peft_greedy(model, dirs[k], PROMPTS[0], NEW_TOKENS) != base[0] for k in PER_LAYER)


def test_half_scale_is_peft_with_the_delta_halved(setup, tmp_path):
    model, dirs = setup
    lora = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs["lora_all"])).eval()
    for module in lora.modules():
        if hasattr(module, "scale_layer"):
            module.scale_layer(0.5)
    # IA³ at s: each vector interpolated toward 1, 1 + s·(v − 1)
    ia3_dir = tmp_path / "ia3_half"
    ia3_dir.mkdir()
    config = json.loads((dirs["ia3"] / "adapter_config.json").read_text())
    (ia3_dir / "adapter_config.json").write_text(json.dumps(config))
    vectors = load_file(dirs["ia3"] / "adapter_model.safetensors")
    save_file({k: v * 0.5 + 0.5 for k, v in vectors.items()}, ia3_dir / "adapter_model.safetensors")
    engine = make_engine(model, dirs)
    jobs = {}
    for i, prompt in enumerate(PROMPTS):
        for kind in ("lora_all", "ia3"):
            jobs[(kind, i)] = engine.submit(_scaled(prompt, kind, 0.5), sink=lambda d: None)
        jobs[("full", i)] = engine.submit(_scaled(prompt, "lora_all", 1.0), sink=lambda d: None)
    engine.run_until_idle()
    for i, prompt in enumerate(PROMPTS):
        assert jobs[("lora_all", i)].output_ids == _greedy(lora, prompt, NEW_TOKENS, 2), i
        assert jobs[("ia3", i)].output_ids == peft_greedy(model, ia3_dir, prompt, NEW_TOKENS), i
        assert jobs[("full", i)].output_ids == peft_greedy(model, dirs["lora_all"], prompt, NEW_TOKENS), i
    assert any(jobs[("lora_all", i)].output_ids != jobs[("full", i)].output_ids for i in range(len(PROMPTS)))


@pytest.mark.parametrize(
    ("task", "scale", "fragment"),
    [
        ("lora_all", 2.5, "outside [0, 2]"),
        ("lora_all", -0.1, "outside [0, 2]"),
        ("prefix", 0.5, "a prefix_tuning task has no per-layer adapter weights"),
        ("base", 0.0, "the backbone has no per-layer adapter weights"),
    ],
)
def test_a_scale_out_of_range_or_without_per_layer_weights_is_refused(setup, task, scale, fragment):
    model, dirs = setup
    engine = make_engine(model, {"lora_all": dirs["lora_all"], "prefix": dirs["prefix"]})
    with pytest.raises(InvalidRequest, match=r"adapter_scale") as refused:
        engine.submit(_scaled(PROMPTS[0], task, scale), sink=lambda d: None)
    assert fragment in str(refused.value) and refused.value.param == "adapter_scale"
    assert len(engine.waiting) == 0  # nothing queued
    generation = engine.submit(_scaled(PROMPTS[0], task, 1.0), sink=lambda d: None)
    engine.run_until_idle()
    assert generation.output_ids == peft_greedy(model, dirs.get(task), PROMPTS[0], NEW_TOKENS)
