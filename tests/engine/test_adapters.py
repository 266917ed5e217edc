"""Adapter loading: what we refuse (and why, by name), LoRA scaling, prefix layout."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft_reference import REFUSED_KINDS, load_reference, make_adapter, tiny_gpt2, tiny_llama
from serving import files_of, peft_files, serve, tasks_of

from adapters_store import AdapterKey
from adapters_store.format import FormatError
from server.engine.adapters import AdapterError, Placement, load_adapter, read_peft_dir
from server.engine.backbone import Backbone, Geometry
from server.engine.residency import Residency

CPU = Placement(device=torch.device("cpu"), dtype=torch.float32)
SERVED_TYPES = (
    *("ADALORA", "ADAPTION_PROMPT", "IA3", "LOHA", "LOKR", "LORA", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"),
    "VERA",
)


@pytest.fixture(scope="module")
def models():
    """The backbone adapters are loaded into, and models of other shapes to make mismatching adapters on."""
    return {
        "base": tiny_llama(),  # hidden 64, 2 layers, 4 heads, 2 KV heads
        "hidden96": tiny_llama(hidden_size=96),
        "layers3": tiny_llama(num_layers=3),
        "kv1": tiny_llama(num_kv_heads=1),
    }


@pytest.fixture(scope="module")
def geometry(models) -> Geometry:
    return Backbone(models["base"], None, name="tiny").geometry


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory) -> Callable[[str, str], Path]:
    """adapters(kind, model name) -> a saved PEFT directory, made once."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple[str, str], Path] = {}

    def get(kind: str, model: str = "base") -> Path:
        if (kind, model) not in made:
            made[(kind, model)] = make_adapter(models[model], kind, root / f"{model}-{kind}", seed=len(made))
        return made[(kind, model)]

    return get


# --- refusals -------------------------------------------------------------------------------------


def _poison(key_part: str, value: float):
    def edit(config, tensors):
        key = next(k for k in sorted(tensors) if key_part in k)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = value

    return edit


def _set(**fields):
    def edit(config, tensors):
        config.update(fields)

    return edit


def _drop_config(name: str):
    def edit(config, tensors):
        del config[name]

    return edit


def _drop_tensors(key_part: str):
    def edit(config, tensors):
        for key in [k for k in tensors if key_part in k]:
            del tensors[key]

    return edit


def _add_bias(module: str):
    """A trained base bias (bias='lora_only') for a layer of the llama backbone, which has none."""

    def edit(config, tensors):
        config["bias"] = "lora_only"
        tensors[f"base_model.model.model.layers.0.self_attn.{module}.base_layer.bias"] = torch.zeros(64)

    return edit


def _add_tensor(key: str):
    def edit(config, tensors):
        tensors[key] = torch.zeros(4)

    return edit


def _rename_module(old: str, new: str):
    def edit(config, tensors):
        for key in [k for k in tensors if old in k]:
            tensors[key.replace(old, new)] = tensors.pop(key)

    return edit


def _transpose(module: str):
    def edit(config, tensors):
        key = next(k for k in sorted(tensors) if module in k)
        tensors[key] = tensors[key].t().contiguous()

    return edit


def _unchanged(config, tensors):
    pass


# (case id, adapter kind, model it was made on, edit of (config, tensors), words the refusal must contain)
REFUSALS = [
    *[
        (f"refused-{kind}", kind, "base", _unchanged, [field])
        for kind, field in zip(REFUSED_KINDS, ("modules_to_save=['lm_head']",), strict=True)
    ],
    ("dora-magnitude-without-use_dora", "dora", "base", _set(use_dora=False), ["lora_magnitude_vector"]),
    ("dora-without-magnitude", "dora", "base", _drop_tensors("lora_magnitude_vector"), ["lacks its lora_magnitude"]),
    ("dora-with-lora_bias", "dora", "base", _set(lora_bias=True), ["use_dora", "lora_bias"]),
    ("lora-bias-without-lora_bias", "lora_bias", "base", _set(lora_bias=False), ["lora_B.bias"]),
    ("lora-without-lora_A", "lora_qv", "base", _drop_tensors("0.self_attn.q_proj.lora_A"), ["q_proj", "lora_A"]),
    ("lora-bias-unknown", "lora_qv", "base", _set(bias="some"), ["bias='some'"]),
    ("bias-on-a-layer-without-one", "lora_qv", "base", _add_bias("q_proj"), ["q_proj", "no bias to replace"]),
    ("unknown-peft-type", "lora_qv", "base", _set(peft_type="BOFT"), ["BOFT", *SERVED_TYPES]),
    ("adalora-without-E", "adalora", "base", _drop_tensors("0.self_attn.q_proj.lora_E"), ["q_proj", "lora_E"]),
    ("adalora-mask-dropped", "adalora", "base", _set(rank_pattern={}), ["lora_A", "[6, 128]", "kept rank"]),
    ("adalora-with-dora", "adalora", "base", _set(use_dora=True), ["use_dora=True", "AdaLoRA"]),
    (
        "loha-conv-tensor",
        "loha",
        "base",
        _add_tensor("base_model.model.model.layers.0.mlp.up_proj.hada_t1"),
        ["hada_t1"],
    ),
    ("loha-half-missing", "loha", "base", _drop_tensors("0.mlp.up_proj.hada_w2_b"), ["up_proj", "hada_w2_b"]),
    ("loha-hidden-96", "loha", "hidden96", _unchanged, ["down_proj", "[96, 128]", "[64, 128]"]),
    ("lokr-half-missing", "lokr", "base", _drop_tensors("0.mlp.down_proj.lokr_w2_b"), ["down_proj", "lokr_w2_b"]),
    ("vera-without-projections", "vera", "base", _set(save_projection=False), ["save_projection=False"]),
    ("vera-projections-dropped", "vera", "base", _drop_tensors("vera_A"), ["base_model.vera_A", "save_projection"]),
    ("vera-vector-missing", "vera", "base", _drop_tensors("0.mlp.up_proj.vera_lambda_d"), ["up_proj", "lambda_d"]),
    ("vera-hidden-96", "vera", "hidden96", _unchanged, ["down_proj.vera_lambda_b", "[96]", "[64]"]),
    ("llama-adapter-wrong-layers", "llama_adapter", "base", _set(adapter_layers=2), ["adapter_layers=2", "[1]"]),
    ("llama-adapter-3-layers", "llama_adapter", "layers3", _unchanged, ["layers.2.self_attn", "not an attention"]),
    ("llama-adapter-no-gate", "llama_adapter", "base", _drop_tensors("adaption_gate"), ["adaption_gate"]),
    ("llama-adapter-hidden-96", "llama_adapter", "hidden96", _unchanged, ["adaption_prompt", "[1, 4, 64]"]),
    ("lokr-hidden-96", "lokr", "hidden96", _unchanged, ["down_proj", "[96, 128]", "[64, 128]"]),
    ("prompt-without-task_type", "prompt", "base", _drop_config("task_type"), ["task_type", "CAUSAL_LM"]),
    ("prefix-without-task_type", "prefix", "base", _drop_config("task_type"), ["task_type", "CAUSAL_LM"]),
    ("lora-nan", "lora_qv", "base", _poison("lora_B", float("nan")), ["lora_B", "NaN or Inf"]),
    ("prompt-inf", "prompt", "base", _poison("prompt_embeddings", float("inf")), ["prompt_embeddings", "NaN or Inf"]),
    ("prefix-nan", "prefix", "base", _poison("prompt_embeddings", float("nan")), ["prompt_embeddings", "NaN or Inf"]),
    ("ia3-inf", "ia3", "base", _poison("ia3_l", float("-inf")), ["ia3_l", "NaN or Inf"]),
    ("lora-hidden-96", "lora_qv", "hidden96", _unchanged, ["lora_A.weight", "[4, 96]", "[4, 64]"]),
    ("prompt-hidden-96", "prompt", "hidden96", _unchanged, ["token_dim=96", "hidden size is 64"]),
    ("ia3-hidden-96", "ia3", "hidden96", _unchanged, ["ia3_l", "shape"]),
    ("prefix-3-layers", "prefix", "layers3", _unchanged, ["num_layers=3", "2 layers"]),
    ("prefix-1-kv-head", "prefix", "kv1", _unchanged, ["token_dim=16", "2 KV heads"]),
    ("prefix-config-lies-about-layers", "prefix", "layers3", _set(num_layers=2), ["prompt_embeddings", "shape"]),
    ("lora-module-missing", "lora_qv", "layers3", _unchanged, ["model.layers.2.self_attn", "not a linear layer"]),
    (
        "lora-renamed-module",
        "lora_qv",
        "base",
        _rename_module("self_attn.q_proj", "self_attn.qkv_proj"),
        ["model.layers.0.self_attn.qkv_proj", "not a linear layer"],
    ),
    ("lora-extra-tensor", "lora_qv", "base", _add_tensor("base_model.model.model.norm.weight"), ["model.norm.weight"]),
    ("prompt-extra-tensor", "prompt", "base", _add_tensor("prompt_encoder.extra"), ["prompt_encoder.extra"]),
    ("lora-rank-pattern-dropped", "lora_pattern", "base", _set(rank_pattern={}), ["q_proj.lora_A.weight", "[2, 64]"]),
    ("ia3-out-vector-transposed", "ia3", "base", _transpose("k_proj"), ["k_proj", "non-feed-forward", "[32, 1]"]),
    ("ia3-in-vector-transposed", "ia3", "base", _transpose("down_proj"), ["down_proj", "feed-forward", "[1, 128]"]),
    ("ia3-feedforward-config-wrong", "ia3", "base", _set(feedforward_modules=[]), ["down_proj", "[64, 1]"]),
]


@pytest.mark.parametrize(
    ("kind", "made_on", "edit", "words"), [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS]
)
def test_refused_adapter_names_the_cause_and_leaves_the_residency_alone(models, adapters, kind, made_on, edit, words):
    config, tensors = read_peft_dir(adapters(kind, made_on))
    edit(config, tensors)
    residency = Residency(Backbone(models["base"], None, name="tiny"))
    served = serve(residency, "task", adapters("lora_qv"))

    with pytest.raises((AdapterError, FormatError)) as refused:  # the engine's checks, or the file format's
        serve(residency, "task", files_of(config, tensors))
    for word in words:
        assert word in str(refused.value)
    with pytest.raises((AdapterError, FormatError)):
        serve(residency, "other", files_of(config, tensors))

    assert [t.task_id for t in residency.store.iter_tasks()] == ["task"]
    assert residency.get(AdapterKey("task", 1)) is served  # the previous version is still the one served
    again, _ = tasks_of(residency).upload("task", peft_files(adapters("lora_qv")), description="again")
    assert again.version == 2  # no version was used up


def test_served_kinds_load(models, geometry, adapters):
    backbone = Backbone(models["base"], None, name="tiny")
    placement = Placement(CPU.device, CPU.dtype, base_linear=backbone.linear_weights)  # DoRA's norm reads W
    kinds = ("prompt", "ptuning_mlp", "prefix", "prefix_proj", "lora_all", "lora_rslora", "ia3", "dora", "lora_bias")
    for kind in (*kinds, "adalora", "loha", "lokr", "vera", "llama_adapter"):
        loaded = load_adapter(AdapterKey("t", 1), *read_peft_dir(adapters(kind)), geometry, placement)
        assert loaded.parameters > 0, kind


class _Explodes:
    """Unpickling this creates `marker`; the refusal must not get that far."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path, monkeypatch, adapters):
    marker = tmp_path / "unpickled"
    (tmp_path / "adapter_config.json").write_bytes((adapters("lora_qv") / "adapter_config.json").read_bytes())
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Explodes(marker)}))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(AdapterError, match="safe_serialization=True"):
        read_peft_dir(tmp_path)
    assert not marker.exists()


def test_broken_files_are_refused(tmp_path, adapters):
    source = adapters("lora_qv")
    config, weights = (source / "adapter_config.json").read_bytes(), (source / "adapter_model.safetensors").read_bytes()
    cases = {
        "bad-json": (b'{"peft_type": "LORA", ', weights, "not valid JSON"),
        "json-list": (b"[1, 2]", weights, "JSON object"),
        "truncated": (config, weights[: len(weights) // 2], "not a valid safetensors file"),
        "header-only": (config, weights[:6], "not a valid safetensors file"),
    }
    for name, (config_bytes, weight_bytes, message) in cases.items():
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_bytes(config_bytes)
        (path / "adapter_model.safetensors").write_bytes(weight_bytes)
        with pytest.raises(AdapterError, match=message):
            read_peft_dir(path)


# --- LoRA scaling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "patch", "expected"),
    [
        ("lora_qv", {}, {"q_proj": 8 / 4, "v_proj": 8 / 4}),  # alpha / r
        ("lora_rslora", {}, dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), 8 / math.sqrt(16))),
        # r=4, alpha=4, rank_pattern {q_proj: 2}, alpha_pattern {v_proj: 16}
        ("lora_pattern", {}, {"q_proj": 4 / 2, "k_proj": 4 / 4, "v_proj": 16 / 4, "o_proj": 4 / 4}),
        (
            "lora_pattern",
            {"use_rslora": True},
            {"q_proj": 4 / math.sqrt(2), "k_proj": 4 / 2, "v_proj": 16 / 2, "o_proj": 4 / 2},
        ),
    ],
    ids=["alpha-over-r", "rslora", "patterns", "patterns-rslora"],
)
def test_lora_scaling(geometry, models, adapters, kind, patch, expected):
    config, tensors = read_peft_dir(adapters(kind))
    loaded = load_adapter(AdapterKey("t", 1), {**config, **patch}, tensors, geometry, CPU)
    assert sorted(loaded.lora) == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in expected)
    for name, module in loaded.lora.items():
        assert module.scaling == pytest.approx(expected[name.rsplit(".", 1)[1]], rel=1e-12), name
    if not patch:  # and PEFT itself agrees
        reference = load_reference(models["base"], adapters(kind))
        for name, module in reference.named_modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                assert loaded.lora[name.removeprefix("base_model.model.")].scaling == module.scaling["default"]


# --- prefix layout --------------------------------------------------------------------------------


def test_prefix_layout_is_layer_then_k_or_v_then_head(models, adapters):
    model = models["layers3"]  # 3 layers, 4 query heads over 2 KV heads: layout bugs cannot hide
    geometry = Backbone(model, None, name="tiny3").geometry
    config, tensors = read_peft_dir(adapters("prefix", "layers3"))
    loaded = load_adapter(AdapterKey("t", 1), config, tensors, geometry, CPU)
    flat = tensors["prompt_embeddings"]
    layers, kv_heads, head_dim, nvt = 3, 2, 16, config["num_virtual_tokens"]
    assert loaded.prefix_kv.shape == (layers, 2, kv_heads, nvt, head_dim)
    for layer in range(layers):
        for k_or_v in range(2):
            for head in range(kv_heads):
                start = ((layer * 2 + k_or_v) * kv_heads + head) * head_dim
                assert torch.equal(loaded.prefix_kv[layer, k_or_v, head], flat[:, start : start + head_dim])
    # PEFT's own get_prompt builds the same cache
    cache = load_reference(model, adapters("prefix", "layers3")).get_prompt(batch_size=1)
    for layer in range(layers):
        assert torch.equal(cache.layers[layer].keys[0], loaded.prefix_kv[layer, 0])
        assert torch.equal(cache.layers[layer].values[0], loaded.prefix_kv[layer, 1])


def test_bias_all_on_gpt2_is_refused_for_its_layer_norm_biases(tmp_path):
    model = tiny_gpt2()
    config, tensors = read_peft_dir(make_adapter(model, "lora_bias_all", tmp_path / "bias_all"))
    residency = Residency(Backbone(model, None, name="tiny-gpt2"))
    with pytest.raises(AdapterError, match=r"ln_1.bias.*layer norms.*bias='lora_only'"):
        serve(residency, "task", files_of(config, tensors))
    assert list(residency.store.iter_tasks()) == []


def test_llama_adapter_on_gpt2_is_refused_as_served_for_the_llama_family():
    config = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": 4, "adapter_layers": 1}
    tensors = {"base_model.model.transformer.h.1.attn.adaption_prompt": torch.zeros(1, 4, 64)}
    tensors["base_model.model.transformer.h.1.attn.adaption_gate"] = torch.zeros(1)
    residency = Residency(Backbone(tiny_gpt2(), None, name="tiny-gpt2"))
    with pytest.raises(AdapterError, match=r"transformer.h.1.attn.*llama family"):
        serve(residency, "task", files_of(config, tensors))


def test_the_upload_checks_and_the_engine_serve_the_same_kinds() -> None:
    """One table: every PEFT type the format accepts has an engine loader, registered under the table's name."""
    from adapters_store import kinds
    from adapters_store.format import inspect_peft
    from server.engine.adapters.base import LOADERS, loader_for, register

    assert set(kinds.served_peft_types()) == set(SERVED_TYPES)
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    weights = len(header).to_bytes(8, "little") + header + b"\0" * 4
    for kind in kinds.KINDS:
        for peft_type in kind.peft_types:
            config = f'{{"peft_type": "{peft_type}"}}'.encode()
            summary = inspect_peft({"adapter_config.json": config, "adapter_model.safetensors": weights})
            assert summary.kind == kind.name
            assert loader_for(peft_type) is LOADERS[kind.name]
    assert kinds.TEMPLATE.name not in LOADERS  # a template has no PEFT files: residency renders it
    with pytest.raises(ValueError, match="not a PEFT kind"):
        register(type("Boft", (), {"kinds": ("boft",)})())
