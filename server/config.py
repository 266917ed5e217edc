"""Service settings: one typed object, from env `TASKSERVE_*` or CLI flags, validated at start-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.engine.backbone import DEFAULT_MODEL, default_cache_dir


class EngineSettings(BaseSettings):
    """What the engine is bounded by; every resource has a limit here."""

    model_config = SettingsConfigDict(
        env_prefix="TASKSERVE_",
        extra="ignore",
        use_attribute_docstrings=True,
        cli_kebab_case=True,
        cli_prog_name="python -m server",
    )

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Rows in the running batch (decoding or part-way through their prompt)."""
    max_step_tokens: int = Field(default=256, ge=1)
    """Inputs computed in one forward: each decoding row's token first, then prompt chunks up to this budget
    (a long prompt is prefilled over several steps while running rows keep decoding)."""
    max_kv_tokens: int = Field(default=65536, ge=16)
    """KV-cache columns in the pool shared by all rows; each row reserves its longest need when admitted."""
    kv_block_size: int = Field(default=16, ge=1, le=1024)
    """KV columns per block: the unit in which rows take and give back KV memory."""
    max_queue: int = Field(default=1024, ge=0)
    """Requests waiting for admission; past it, submit fails with QueueFull (HTTP 429)."""
    max_new_tokens: int = Field(default=2048, ge=1)
    """Upper bound a request may ask for."""
    lora_backend: Literal["auto", "gathered", "segmented", "loop"] = "auto"
    """How LoRA rows are computed: auto picks per step and layer family between gathered (each token's weights
    gathered by slot, two batched matmuls) and segmented (rows of one adapter as one run of plain matmuls);
    loop is the per-row reference."""


class Settings(EngineSettings):
    """Everything the service reads at start-up."""

    model: str = DEFAULT_MODEL
    """Backbone: the built-in default name, a local Hugging Face directory, a .gguf file, or a hub id."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""
    model_cache: Path = Field(default_factory=default_cache_dir)
    """Where the default GGUF model is converted to safetensors, once."""
    store: str = "file://data/store"
    """Where task versions are kept: file://PATH (embedded, the default), redis://HOST:PORT/DB (shared by replicas),
    or memory:// (this process only)."""
    device_adapter_bytes: int = Field(default=1 << 30, ge=1)
    """Adapter bytes kept on the device; least recently used tasks not in use are evicted past it."""
    host_adapter_bytes: int = Field(default=4 << 30, ge=0)
    """Uploaded files kept in host RAM so a reload after eviction skips the store."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port the HTTP server binds."""
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    """Largest adapter upload accepted (HTTP 413 past it)."""
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Inference keys, comma-separated: generate, the OpenAI routes, reading tasks. With no api_keys and no
    admin_keys the service is open to anyone who can reach it. Prefer the env variable: flags show in `ps`."""
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    """Admin keys, comma-separated: upload, roll back and delete tasks, and everything an inference key may do."""
    console: bool = True
    """Serve the web console at /console/ (and redirect / there); its data still needs a key when keys are set."""

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """`a,b` (env or flag) or a JSON list; blanks around keys and empty entries are dropped."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list):
            value = [k.strip() if isinstance(k, str) else k for k in value]
            return [k for k in value if k != ""]
        return value
