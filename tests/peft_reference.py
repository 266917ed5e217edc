"""Reference helpers for taskserve's PEFT-parity tests (a plain module, not a test file).

Everything here runs in-process on CPU and never touches the network:

* ``tiny_llama`` / ``tiny_gpt2`` build small random fp32 models from a config (no downloads).
* ``make_adapter`` wraps a deep copy of a model with ``peft.get_peft_model`` for one of the
  named adapter kinds, randomises the adapter so it visibly changes the output, and saves it
  with ``save_pretrained`` (safetensors).
* ``peft_greedy`` / ``peft_greedy_many`` are THE reference: ``PeftModel.from_pretrained`` on a
  copy of the base model, then a cache-free greedy loop over ``PeftModel.forward`` (batch of one,
  no padding).  ``PeftModel.generate`` is deliberately NOT used: with peft 0.21.2 +
  transformers 5.x it silently drops prefix KV and re-injects soft prompts at every decode step
  (see docs/adapters.md, "Traps").

See docs/adapters.md for how PEFT saves and applies each adapter kind.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Sequence

import torch

# Belt and braces: nothing here needs the Hub.  Set before transformers/peft/huggingface_hub are
# imported by this module (no effect if the caller already imported them; we avoid every Hub code
# path anyway: save_embedding_layers=False, local adapter dirs only).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from peft import (  # noqa: E402
    AdaLoraConfig,
    AdaptionPromptConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

__all__ = [
    "ALL_SERVED_KINDS",
    "COMPOSITES",
    "REFUSED_KINDS",
    "BIAS_KINDS",
    "PROMPT_LEARNING_KINDS",
    "LORA_KINDS",
    "tiny_llama",
    "tiny_gpt2",
    "random_biases",
    "adapter_config",
    "make_adapter",
    "make_composite",
    "load_reference",
    "peft_greedy",
    "peft_greedy_many",
    "clear_reference_cache",
]

BOS_ID = 1
EOS_ID = 2
PAD_ID = 0

ALL_SERVED_KINDS: tuple[str, ...] = (
    "prompt",
    "prompt_long",
    "ptuning_mlp",
    "ptuning_lstm",
    "prefix",
    "prefix_proj",
    "lora_qv",
    "lora_all",
    "lora_rslora",
    "lora_pattern",
    "ia3",
    "dora",
    "lora_bias",
    "adalora",
    "loha",
    "lokr",
    "vera",
    "vera_wide",
    "llama_adapter",
)
# composite tasks (llama): name -> its parts (component name, kind, scale), in the stated order
COMPOSITES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "composite_mam": (("prefix", "prefix", 1.0), ("lora", "lora_ffn", 1.0)),  # prefix at attention, LoRA on FFN
    "composite_prompt_lora_ia3": (("prompt", "prompt", 1.0), ("lora", "lora_all", 0.5), ("ia3", "ia3", 1.0)),
    "composite_adapter_lora": (("adapter", "llama_adapter", 1.0), ("lora", "lora_ffn", 1.0)),
    "composite_dora_vera": (("dora", "dora", 1.0), ("vera", "vera", 1.0)),  # one layer, two kinds stacked
}
# kinds that only differ from plain LoRA where the backbone's linear layers have biases (GPT-2, Qwen2)
BIAS_KINDS: tuple[str, ...] = ("lora_bias_only", "lora_bias_all", "dora_bias")
REFUSED_KINDS: tuple[str, ...] = ("modules_to_save",)

PROMPT_LEARNING_KINDS: tuple[str, ...] = (
    "prompt",
    "prompt_long",
    "ptuning_mlp",
    "ptuning_lstm",
    "prefix",
    "prefix_proj",
)
LORA_KINDS: tuple[str, ...] = ("lora_qv", "lora_all", "lora_rslora", "lora_pattern", "dora", "lora_bias")


# ---------------------------------------------------------------------------------------------
# Tiny base models
# ---------------------------------------------------------------------------------------------


def random_biases(model, seed: int) -> None:
    """Transformers initialises linear biases to zero, which would hide how a kind treats the backbone's biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "ln" not in name and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _finish_model(model, name: str):
    model.config._name_or_path = name
    try:
        model.name_or_path = name
    except AttributeError:  # pragma: no cover - property without setter in some versions
        pass
    model.to(torch.float32)
    model.eval()
    return model


def tiny_llama(
    seed: int = 0,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
) -> LlamaForCausalLM:
    """A small random fp32 llama (GQA: ``num_kv_heads < num_heads``), eval mode, no downloads."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _finish_model(model, "tiny-llama")


def tiny_gpt2(
    seed: int = 0,
    vocab_size: int = 256,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
) -> GPT2LMHeadModel:
    """A small random fp32 GPT-2 (untied lm_head), eval mode, no downloads."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    random_biases(model, seed)
    return _finish_model(model, "tiny-gpt2")


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


def _is_gpt2(model) -> bool:
    return getattr(model.config, "model_type", None) == "gpt2"


def adapter_config(model, kind: str):
    """The ``PeftConfig`` that ``make_adapter`` uses for ``kind`` on ``model``'s architecture."""
    gpt2 = _is_gpt2(model)
    ffo = {"fan_in_fan_out": True} if gpt2 else {}
    causal = {"task_type": "CAUSAL_LM"}

    if kind == "prompt":
        return PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="RANDOM", **causal)
    if kind == "prompt_long":
        return PromptTuningConfig(num_virtual_tokens=9, prompt_tuning_init="RANDOM", **causal)
    if kind == "ptuning_mlp":
        return PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="MLP", **causal)
    if kind == "ptuning_lstm":
        return PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM", **causal)
    if kind == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=6, prefix_projection=False, **causal)
    if kind == "prefix_proj":
        return PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32, **causal)

    attn_targets = ["c_attn", "attn.c_proj"] if gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj"]
    qv_targets = ["c_attn"] if gpt2 else ["q_proj", "v_proj"]
    if kind == "lora_qv":
        return LoraConfig(r=4, lora_alpha=8, target_modules=qv_targets, lora_dropout=0.1, **ffo, **causal)
    if kind == "lora_ffn":  # the feed-forward layers only (the LoRA half of a prefix + LoRA composite)
        targets = ["mlp.c_fc", "mlp.c_proj"] if gpt2 else ["gate_proj", "up_proj", "down_proj"]
        return LoraConfig(r=8, lora_alpha=16, target_modules=targets, **ffo, **causal)
    if kind == "lora_all":
        return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **ffo, **causal)
    if kind == "lora_rslora":
        # gpt2: "c_proj" (as briefed) matches BOTH attn.c_proj and mlp.c_proj.
        targets = ["c_attn", "c_proj"] if gpt2 else ["q_proj", "k_proj", "v_proj", "o_proj"]
        return LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=targets, **ffo, **causal)
    if kind == "lora_pattern":
        if gpt2:
            rank_pattern, alpha_pattern = {"c_attn": 2}, {"c_proj": 16}
        else:
            rank_pattern, alpha_pattern = {"q_proj": 2}, {"v_proj": 16}
        return LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=attn_targets,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            **ffo,
            **causal,
        )
    if kind == "ia3":
        # target_modules / feedforward_modules left None -> PEFT's per-architecture defaults.
        return IA3Config(**ffo, **causal)

    # LoRA variants: DoRA, a bias on lora_B, trained base biases
    mlp_targets = ["c_attn", "mlp.c_fc"] if gpt2 else ["q_proj", "v_proj", "up_proj", "down_proj"]
    if kind == "dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=mlp_targets, use_dora=True, **ffo, **causal)
    if kind == "dora_bias":
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=qv_targets, use_dora=True, bias="lora_only", **ffo, **causal
        )
    if kind == "lora_bias":
        return LoraConfig(r=4, lora_alpha=8, target_modules=mlp_targets, lora_bias=True, **ffo, **causal)
    if kind == "lora_bias_only":
        return LoraConfig(r=4, lora_alpha=8, target_modules=qv_targets, bias="lora_only", **ffo, **causal)
    if kind == "lora_bias_all":
        return LoraConfig(r=4, lora_alpha=8, target_modules=qv_targets, bias="all", **ffo, **causal)

    # the LoRA family beyond LoRA (llama only: PEFT's LoHa and LoKr do not take GPT-2's Conv1D)
    if kind == "adalora":  # make_adapter prunes ranks the way AdaLoRA's final mask would
        return AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=mlp_targets, **causal)
    if kind == "loha":  # r*r = 16 < 64: folded to a rank-16 LoRA; down_proj's rank 8 (64) is stored dense
        return LoHaConfig(r=4, alpha=8, target_modules=mlp_targets, rank_pattern={"down_proj": 8}, **causal)
    if kind == "lokr":  # q_proj: w1 8x8 and w2 8x8 whole (dense); down_proj: w2 in halves of rank 2 (rank 16)
        return LoKrConfig(r=4, alpha=8, target_modules=mlp_targets, rank_pattern={"down_proj": 2}, **causal)

    if kind == "vera":  # the projections' key is PEFT's default (0): adapters made with it share them
        return VeraConfig(r=16, target_modules=mlp_targets, **ffo, **causal)
    if kind == "vera_wide":  # another rank: other projections, pooled apart
        return VeraConfig(r=8, target_modules=attn_targets, projection_prng_key=7, **ffo, **causal)

    if kind == "llama_adapter":  # LLaMA-Adapter: the llama family only
        return AdaptionPromptConfig(adapter_len=4, adapter_layers=1, **causal)

    # Refused-on-purpose kinds (valid PEFT adapters that taskserve must reject).
    if kind == "modules_to_save":
        return LoraConfig(r=4, lora_alpha=8, target_modules=qv_targets, modules_to_save=["lm_head"], **ffo, **causal)
    raise ValueError(f"unknown adapter kind {kind!r}")


@torch.no_grad()
def _randomise(peft_model, kind: str, gen: torch.Generator) -> None:
    """Make the adapter non-trivial.  Prompt-learning encoders are already random (N(0,1)
    embeddings / default Linear+LSTM init); LoRA B is zero and IA3 is ones by default."""
    for name, p in peft_model.named_parameters():
        if ".lora_A." in name:
            fan_in = p.shape[1]
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in**0.5))
        elif ".lora_B." in name:
            r = p.shape[1] if p.dim() == 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / r**0.5))
        elif name.endswith(".ia3_l.default") or ".ia3_l." in name:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
        elif ".lora_E." in name:  # AdaLoRA's singular values (zero at init)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif ".hada_" in name:  # LoHa's factors (one of each pair zero at init)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        elif ".lokr_" in name:  # LoKr's (the same)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
        elif ".vera_lambda_" in name:  # VeRA's vectors (lambda_b zero at init)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        elif name.endswith(".adaption_gate"):  # LLaMA-Adapter's gate (zero at init: no effect)
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
        elif ".lora_magnitude_vector." in name:  # DoRA: already ||W|| per row; move it off the identity
            p.mul_(torch.empty(p.shape).uniform_(0.7, 1.3, generator=gen))
        elif ".modules_to_save.default." in name:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        elif kind in BIAS_KINDS and name.endswith(".bias") and p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _prune_adalora(peft_model) -> None:
    """A final AdaLoRA rank mask, as training leaves it: each module keeps some ranks, one keeps none."""
    names = sorted(n for n, _ in peft_model.base_model.model.named_parameters() if ".lora_E." in n)
    masks = {}
    for i, name in enumerate(names):
        init_r = peft_model.peft_config["default"].init_r
        masks[name] = [False] * init_r if i == 1 else [(i + k) % 3 != 0 for k in range(init_r)]
    peft_model.peft_config["default"].rank_pattern = masks


def make_adapter(model, kind: str, out_dir, seed: int = 0, config=None) -> pathlib.Path:
    """Wrap a deep copy of ``model`` with adapter ``kind``, randomise it, save to ``out_dir``.

    ``config`` replaces ``adapter_config(model, kind)`` (benchmarks use other sizes); ``kind`` still says
    how to randomise. The caller's model is never mutated.  Returns ``pathlib.Path(out_dir)`` which then
    contains ``adapter_config.json``, ``adapter_model.safetensors`` and PEFT's ``README.md``.
    """
    out_dir = pathlib.Path(out_dir)
    cfg = config if config is not None else adapter_config(model, kind)
    base = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        # seeds the default (random) init of prompt embeddings, p-tuning MLP/LSTM, prefix MLP
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. fan_in_fan_out / encoder_num_layers notices
            pm = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(10_000 + seed)
    _randomise(pm, kind, gen)
    if kind == "adalora":
        _prune_adalora(pm)
    pm.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: skips PEFT's "was the vocab resized?" check, which would look the
    # (non-existent) base model "tiny-llama" up on the Hub.
    pm.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=False)
    return out_dir


def make_composite(model, parts: Sequence[tuple] | str, out_dir, seed: int = 0) -> pathlib.Path:
    """A composite task's upload directory: ``task.json`` and one ``make_adapter`` folder per part.

    ``parts``: ``(name, kind, scale)`` or ``(name, kind, scale, config)``, in the stated order, or a name in
    ``COMPOSITES``.
    """
    parts = COMPOSITES[parts] if isinstance(parts, str) else parts
    out_dir = pathlib.Path(out_dir)
    entries: list[object] = []
    for i, (name, kind, scale, *config) in enumerate(parts):
        make_adapter(model, kind, out_dir / name, seed=seed + i, config=config[0] if config else None)
        entries.append(name if scale == 1 else {"name": name, "scale": scale})
    (out_dir / "task.json").write_text(json.dumps({"components": entries}))
    return out_dir


_PROMPT_LEARNING_TYPES = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT"}


def _composite_reference(model, adapter_dir: pathlib.Path) -> torch.nn.Module:
    """PEFT's composition: each per-layer component merged into the model in order (its scale applied to the
    LoRA scaling first), then the prompt-learning component, if any, wrapped around the merged model."""
    merged, prompt_dir = copy.deepcopy(model), None
    for entry in json.loads((adapter_dir / "task.json").read_text())["components"]:
        name, scale = (entry, 1.0) if isinstance(entry, str) else (entry["name"], entry.get("scale", 1.0))
        folder = adapter_dir / name
        if json.loads((folder / "adapter_config.json").read_text())["peft_type"] in _PROMPT_LEARNING_TYPES:
            prompt_dir = folder
            continue
        wrapped = PeftModel.from_pretrained(merged, str(folder))
        if scale != 1.0:
            scaled = [m for m in wrapped.modules() if hasattr(m, "scale_layer")]
            assert scaled, f"component {name}: the reference scales LoRA-like layers only"
            for module in scaled:
                module.scale_layer(scale)
        merged = wrapped.merge_and_unload()
    return merged if prompt_dir is None else PeftModel.from_pretrained(merged, str(prompt_dir))


# ---------------------------------------------------------------------------------------------
# Reference greedy decoding
# ---------------------------------------------------------------------------------------------

# key -> (base model object, loaded model).  The base model object is kept to make the id()
# part of the key safe against id reuse.
_CACHE: dict[tuple, tuple[object, torch.nn.Module]] = {}


def clear_reference_cache() -> None:
    _CACHE.clear()


def _cache_key(model, adapter_dir):
    if adapter_dir is None:
        return (id(model), None)
    d = pathlib.Path(adapter_dir).resolve()
    stamps = []
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            st = (d / f).stat()
            stamps.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            stamps.append(None)
    return (id(model), str(d), tuple(stamps))


def load_reference(model, adapter_dir=None) -> torch.nn.Module:
    """The (cached) eval-mode reference model: ``PeftModel.from_pretrained`` on a deep copy of
    ``model``, or the plain model itself when ``adapter_dir`` is None."""
    key = _cache_key(model, adapter_dir)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    if adapter_dir is None:
        ref = model
    elif (pathlib.Path(adapter_dir) / "task.json").is_file():
        ref = _composite_reference(model, pathlib.Path(adapter_dir))
    else:
        ref = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir))
    ref.eval()
    _CACHE[key] = (model, ref)
    return ref


@torch.inference_mode()
def _greedy(ref, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ValueError("prompt_ids must be non-empty")
    out: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.tensor([prompt_ids + out], dtype=torch.long)
        # Cache-free: the full sequence every step.  No position_ids (PEFT drops/shifts them
        # itself); an all-ones mask (PEFT prepends ones for the virtual tokens).
        res = ref(input_ids=ids, attention_mask=torch.ones_like(ids))
        # Prompt/p-tuning logits are [1, nvt+L, V] (virtual positions first); prefix/LoRA/IA3
        # are [1, L, V].  Either way the last position is the last real token.
        nxt = int(torch.argmax(res.logits[0, -1]).item())
        out.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return out


def peft_greedy(
    model,
    adapter_dir,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_id: int | None = EOS_ID,
) -> list[int]:
    """Reference greedy continuation of ``prompt_ids`` (new tokens only, eos included if hit)."""
    return _greedy(load_reference(model, adapter_dir), prompt_ids, max_new_tokens, eos_token_id)


def peft_greedy_many(
    model,
    adapter_dir,
    prompts: Iterable[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None = EOS_ID,
) -> list[list[int]]:
    """``peft_greedy`` for several prompts (each run alone, batch of one); loads once."""
    ref = load_reference(model, adapter_dir)
    return [_greedy(ref, p, max_new_tokens, eos_token_id) for p in prompts]
