"""Adapter kinds: PEFT's saved files in, inference tensors out, once per task version."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from adapters_store import AdapterKey
from server.engine.adapters import (  # noqa: F401  (each registers its kind)
    adalora,
    adaption_prompt,
    ia3,
    lora,
    lycoris,
    prefix,
    prompt,
    vera,
)
from server.engine.adapters.base import AdapterError, LoadedAdapter, Placement, check_loaders, loader_for
from server.engine.backbone import Geometry

__all__ = ["AdapterError", "LoadedAdapter", "Placement", "load_adapter", "load_peft_files", "read_peft_dir"]

check_loaders()

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def load_adapter(
    key: AdapterKey,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    geometry: Geometry,
    placement: Placement,
) -> LoadedAdapter:
    """Parse and check one PEFT adapter against the backbone; refuse anything we would serve wrong."""
    loader = loader_for(config.get("peft_type"))
    return loader.load(key, loader.parse_config(config), tensors, geometry, placement)


def load_peft_files(
    config_json: bytes, weights: bytes, *, config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Decode `adapter_config.json` and `adapter_model.safetensors`; never unpickles anything.

    `config`: the config already parsed from `config_json` (an upload's format check did), not parsed again.
    """
    if config is None:
        try:
            config = json.loads(config_json)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep to parse
            raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from None
    return config, tensors


def read_peft_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The two files of a PEFT `save_pretrained` directory."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                "adapter_model.bin is a pickle and is never loaded; re-save with safe_serialization=True"
            )
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}")
    return load_peft_files((path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes())
