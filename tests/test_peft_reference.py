"""Self-checks for tests/peft_reference.py (the PEFT parity reference used by other tests)."""

import json
import pathlib
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import peft_reference as R  # noqa: E402

PROMPTS = [[1, 5, 9, 33], [1, 100, 7], [1, 250, 3, 3, 17, 90]]
MAX_NEW = 8

GPT2_KINDS = ("prompt", "prefix", "prefix_proj", "lora_qv", "lora_all", "lora_rslora", "lora_pattern", "ia3")
CASES = [("llama", k) for k in R.ALL_SERVED_KINDS] + [("gpt2", k) for k in (*GPT2_KINDS, "dora", *R.BIAS_KINDS)]


@pytest.fixture(scope="module")
def models():
    return {"llama": R.tiny_llama(), "gpt2": R.tiny_gpt2()}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("peft_reference_adapters")


_ADAPTERS = {}


def _adapter(models, root, arch, kind):
    key = (arch, kind)
    if key not in _ADAPTERS or not (_ADAPTERS[key] / "adapter_config.json").exists():
        _ADAPTERS[key] = R.make_adapter(models[arch], kind, root / arch / kind)
    return _ADAPTERS[key]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_models_conventions(models):
    llama, gpt2 = models["llama"], models["gpt2"]
    assert not llama.training and not gpt2.training
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads  # GQA
    for m in (llama, gpt2):
        assert m.config.eos_token_id == 2 and m.config.bos_token_id == 1 and m.config.pad_token_id == 0
        assert next(m.parameters()).dtype == torch.float32
        assert m.get_output_embeddings().weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()
    # deterministic construction
    a, b = R.tiny_llama(seed=3), R.tiny_llama(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_served_kind_changes_output(models, adapter_root, arch, kind):
    model = models[arch]
    before = _snapshot(model)
    d = _adapter(models, adapter_root, arch, kind)
    assert (d / "adapter_model.safetensors").exists() and (d / "adapter_config.json").exists()
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    base = R.peft_greedy_many(model, None, PROMPTS, MAX_NEW)
    tuned = R.peft_greedy_many(model, d, PROMPTS, MAX_NEW)
    assert any(b != t for b, t in zip(base, tuned)), (base, tuned)
    for out in tuned:
        assert 1 <= len(out) <= MAX_NEW
        assert all(0 <= t < model.config.vocab_size for t in out)
    # the caller's model is never mutated (no injected layers, same weights)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # repeated calls hit the cache and are deterministic
    assert R.load_reference(model, d) is R.load_reference(model, d)
    assert R.peft_greedy(model, d, PROMPTS[0], MAX_NEW) == tuned[0]


def test_eos_stops_and_is_included(models, adapter_root):
    model = models["llama"]
    d = _adapter(models, adapter_root, "llama", "lora_qv")
    for p in PROMPTS:
        free = R.peft_greedy(model, d, p, MAX_NEW, eos_token_id=None)
        assert len(free) == MAX_NEW
        stop = free[2]
        cut = free.index(stop)
        assert R.peft_greedy(model, d, p, MAX_NEW, eos_token_id=stop) == free[: cut + 1]


# ---------------------------------------------------------------------------------------------
# Independent cross-checks of the reference loop (no peft involved on the right-hand side)
# ---------------------------------------------------------------------------------------------


def _prefix_cache(model, emb):
    """docs/adapters.md "Prefix tuning", built by hand: emb [nvt, L*2*kvH*hd] -> per-layer K/V
    [1, kvH, nvt, hd], no RoPE, inserted raw into a fresh DynamicCache."""
    from transformers import DynamicCache

    c = model.config
    n_layers = c.num_hidden_layers
    n_heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or n_heads
    hd = c.hidden_size // n_heads
    nvt = emb.shape[0]
    assert emb.shape[1] == n_layers * 2 * kv_heads * hd
    x = emb.view(nvt, n_layers, 2, kv_heads, hd)
    cache = DynamicCache()
    for layer in range(n_layers):
        k = x[:, layer, 0].permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, kvH, nvt, hd]
        v = x[:, layer, 1].permute(1, 0, 2).unsqueeze(0).contiguous()
        cache.update(k, v, layer)
    return cache


@torch.inference_mode()
def _manual_greedy(model, step_logits, prompt, n):
    out = []
    for _ in range(n):
        nxt = int(torch.argmax(step_logits(model, prompt + out)).item())
        out.append(nxt)
        if nxt == 2:
            break
    return out


@pytest.mark.parametrize(
    "arch,kind", [("llama", "prefix"), ("llama", "prefix_proj"), ("gpt2", "prefix"), ("gpt2", "prefix_proj")]
)
def test_prefix_reference_matches_hand_built_cache(models, adapter_root, arch, kind):
    model = models[arch]
    d = _adapter(models, adapter_root, arch, kind)
    emb = load_file(str(d / "adapter_model.safetensors"))["prompt_embeddings"]
    nvt = emb.shape[0]
    cfg = json.loads((d / "adapter_config.json").read_text())
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    assert cfg["num_attention_heads"] == kv_heads  # GQA override (llama) / n_head (gpt2)
    assert cfg["num_virtual_tokens"] == nvt

    def step_logits(m, seq):
        ids = torch.tensor([seq])
        L = ids.shape[1]
        res = m(
            input_ids=ids,
            cache=_prefix_cache(m, emb),
            attention_mask=torch.ones(1, nvt + L, dtype=torch.long),
            position_ids=(nvt + torch.arange(L)).unsqueeze(0),
        )
        return res.logits[0, -1]

    ref_model = R.load_reference(model, d)
    for p in PROMPTS:
        expected = _manual_greedy(model, step_logits, p, MAX_NEW)
        assert R.peft_greedy(model, d, p, MAX_NEW) == expected
        with torch.inference_mode():
            ids = torch.tensor([p])
            peft_last = ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            torch.testing.assert_close(peft_last, step_logits(model, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,kind", [("llama", "prompt"), ("llama", "ptuning_lstm"), ("gpt2", "prompt")])
def test_soft_prompt_reference_matches_inputs_embeds(models, adapter_root, arch, kind):
    model = models[arch]
    d = _adapter(models, adapter_root, arch, kind)
    soft = load_file(str(d / "adapter_model.safetensors"))["prompt_embeddings"]

    def step_logits(m, seq):
        emb = m.get_input_embeddings()(torch.tensor([seq]))
        x = torch.cat([soft.unsqueeze(0), emb], dim=1)
        return m(inputs_embeds=x).logits[0, -1]  # positions 0..nvt+L-1

    for p in PROMPTS:
        assert R.peft_greedy(model, d, p, MAX_NEW) == _manual_greedy(model, step_logits, p, MAX_NEW)


@pytest.mark.parametrize(
    "arch,kind",
    [("llama", "lora_rslora"), ("llama", "lora_pattern"), ("gpt2", "lora_pattern"), ("gpt2", "lora_all")],
)
def test_lora_reference_matches_merged_weights(models, adapter_root, arch, kind):
    """Merge B@A*scale by hand (rsLoRA: alpha/sqrt(r); per-module alpha_pattern; rank from the
    tensor shape; GPT-2 Conv1D stores W as [in, out]) and compare greedy tokens."""
    import copy
    import re

    model = models[arch]
    d = _adapter(models, adapter_root, arch, kind)
    cfg = json.loads((d / "adapter_config.json").read_text())
    sd = load_file(str(d / "adapter_model.safetensors"))
    merged = copy.deepcopy(model)
    mods = dict(merged.named_modules())
    n = 0
    with torch.no_grad():
        for key, A in sd.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len("base_model.model.") : -len(".lora_A.weight")]
            B = sd[name.join(["base_model.model.", ".lora_B.weight"])]
            r = A.shape[0]
            alpha = cfg["lora_alpha"]
            for pat, a in (cfg.get("alpha_pattern") or {}).items():
                if re.match(rf"(.*\.)?({pat})$", name):
                    alpha = a
                    break
            scale = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
            delta = (B @ A) * scale  # [out, in]
            w = mods[name].weight
            w += delta.T if arch == "gpt2" else delta
            n += 1
    assert n > 0
    merged.eval()

    def step_logits(m, seq):
        return m(input_ids=torch.tensor([seq])).logits[0, -1]

    for p in PROMPTS:
        assert R.peft_greedy(model, d, p, MAX_NEW) == _manual_greedy(merged, step_logits, p, MAX_NEW)


# ---------------------------------------------------------------------------------------------
# Refused-on-purpose kinds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", R.REFUSED_KINDS)
def test_refused_kinds_save_with_offending_field(models, adapter_root, arch, kind):
    d = _adapter(models, adapter_root, arch, kind)
    cfg = json.loads((d / "adapter_config.json").read_text())
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert cfg["peft_type"] == "LORA"
    assert cfg["modules_to_save"] == ["lm_head"]
    assert "base_model.model.lm_head.weight" in keys
    assert kind not in R.ALL_SERVED_KINDS


def test_unknown_kind_raises(models, tmp_path):
    with pytest.raises(ValueError):
        R.make_adapter(models["llama"], "nope", tmp_path / "x")
