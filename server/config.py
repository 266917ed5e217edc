"""Service settings: one typed object, from env `TASKSERVE_*` or CLI flags, validated at start-up.

`python -m server --help` prints every setting with its flag, its env variable, its default and its unit.
Sizes take units (`512MiB`, `2GiB`, or a number of bytes); durations are in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ByteSize, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import TypeAliasType

from server.engine.backbone import DEFAULT_MODEL, default_cache_dir

# named aliases: `--help` shows these names as each flag's metavar instead of Python types
Size = TypeAliasType("SIZE", ByteSize)
Seconds = TypeAliasType("SECONDS", float)
Keys = TypeAliasType("KEYS", Annotated[list[SecretStr], NoDecode])
Entries = TypeAliasType("LIST", Annotated[list[str], NoDecode])

DEFAULT_MODEL_CACHE = Path("~/.cache/taskserve/models")


class EngineSettings(BaseSettings):
    """What the engine is bounded by; every resource has a limit here."""

    model_config = SettingsConfigDict(
        env_prefix="TASKSERVE_",
        extra="ignore",
        use_attribute_docstrings=True,
        cli_kebab_case=True,
        cli_show_env_vars=True,
        cli_prog_name="python -m server",
    )

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    """Rows in the running batch (decoding or part-way through their prompt)."""
    max_step_tokens: int = Field(default=128, ge=1)
    """Inputs computed in one forward: each decoding row's token first, then prompt chunks up to this budget
    (a long prompt is prefilled over several steps while running rows keep decoding). A step's time grows with
    its tokens on a CPU, so the budget trades running rows' inter-token latency against new rows' time to first
    token; 128 keeps both in bounds on a 2-core CPU (docs/benchmarks.md). A GPU takes 512-2048 at little cost."""
    max_kv_tokens: int = Field(default=65536, ge=16)
    """KV-cache columns in the pool shared by all rows; each row reserves its longest need when admitted."""
    kv_block_size: int = Field(default=16, ge=1, le=1024)
    """KV columns per block: the unit in which rows take and give back KV memory."""
    max_queue: int = Field(default=1024, ge=0)
    """Requests waiting for admission; past it, HTTP 429."""
    max_new_tokens: int = Field(default=2048, ge=1)
    """The most tokens a request may ask to generate."""
    max_n: int = Field(default=16, ge=1)
    """The most choices (`n`) one prompt may ask for; they share one prefill of the prompt."""
    lora_backend: Literal["auto", "gathered", "segmented", "loop"] = "auto"
    """How LoRA rows are computed: auto picks per run of one adapter between segmented (plain matmuls on the pooled
    weights) and gathered (each token's weights gathered, two batched matmuls; short runs on a GPU); loop is the
    per-row reference."""


class Settings(EngineSettings):
    """Everything the service reads at start-up. Each flag has an env variable of the same name."""

    model: str = DEFAULT_MODEL
    """Backbone: the built-in default name, a local Hugging Face directory, a .gguf file, or a hub id."""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""
    model_cache: Path = DEFAULT_MODEL_CACHE
    """Directory where the default GGUF model is converted to safetensors, once ($XDG_CACHE_HOME/taskserve/models
    when XDG_CACHE_HOME is set and this is left at its default)."""
    store: str = "file://data/store"
    """Where task versions are kept: file://PATH (embedded, the default), redis://HOST:PORT/DB (shared by replicas),
    or memory:// (this process only)."""
    device_adapter_bytes: Size = Field(default="1GiB", ge=1)
    """Adapter bytes kept on the device (e.g. 512MiB); least recently used tasks not in use are evicted past it."""
    host_adapter_bytes: Size = Field(default="4GiB", ge=0)
    """Uploaded files kept in host RAM so a reload after eviction skips the store."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port the HTTP server binds."""
    probe_port: int | None = Field(default=None, ge=0, le=65535)
    """A second port answering only GET /health and GET /ready, from a thread of its own: probes there never wait
    behind other requests (point Kubernetes' probes at it). Unset: the probes are on the main port only."""
    max_upload_bytes: Size = Field(default="256MiB", ge=1)
    """Largest adapter upload (the files, or the archive); HTTP 413 past it, refused from Content-Length up front."""
    max_request_bytes: Size = Field(default="2MiB", ge=1)
    """Largest body of any other request (a prompt, messages); HTTP 413 past it, before the body is read."""
    body_idle_timeout: Seconds = Field(default=10.0, gt=0)
    """Seconds a request body may stall (no byte arriving) before the request is answered 408."""
    body_timeout: Seconds = Field(default=300.0, gt=0)
    """Seconds a whole request body may take to arrive (a 256 MiB upload needs about 1 MB/s); 408 past it."""
    max_queue_wait: Seconds = Field(default=5.0, gt=0)
    """Seconds a new request may be expected to wait for a place in the batch; past it, HTTP 429 with Retry-After,
    so that requests the server cannot start soon are turned away at once instead of timing out in the queue."""
    api_keys: Keys = []
    """Inference keys, comma-separated: generate, the OpenAI routes, reading tasks. With no api_keys and no
    admin_keys the service is open to anyone who can reach it. Prefer the env variable: flags show in `ps`."""
    admin_keys: Keys = []
    """Admin keys, comma-separated: upload, roll back and delete tasks, and everything an inference key may do."""
    bad_key_attempts: int = Field(default=10, ge=1)
    """Unknown keys one client (IP address) may present per minute; past it every request from that client is
    refused with HTTP 429 and Retry-After until the minute refills, whatever key it sends, so keys can't be
    guessed at speed."""
    trusted_proxies: Entries = ["127.0.0.1"]
    """Addresses (comma-separated, or `*`) whose X-Forwarded-For names the client, as behind nginx: the client
    address the bad-key throttle counts by. `*` only where nothing but the proxy can reach the server."""
    task_metrics: int = Field(default=0, ge=0)
    """Per-task Prometheus series (requests, tokens in and out, queue time, time to first token) for up to this many
    task ids, the first seen first; the tasks past it count together as task `_other`. 0: none (per-tenant series
    are always kept)."""
    console: bool = True
    """Serve the web console at /console/ (and redirect / there); its data still needs a key when keys are set."""
    adapter_roots: Entries = []
    """Directories (comma-separated) under which POST /v1/load_lora_adapter may read a `lora_path` on this
    server's disk; symlinks and `..` are resolved first, and nothing outside them is read. None: the route is 403."""
    preload: Entries = []
    """Tasks to load and pin on the device at start-up, comma-separated: task ids already in the store, or
    `name=path` pairs (a PEFT directory on this server, stored as task `name` unless identical to its current
    version). /ready answers 503 until they are loaded; one that fails to load fails start-up."""

    @field_validator("api_keys", "admin_keys", "adapter_roots", "preload", "trusted_proxies", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """`a,b` (env or flag) or a JSON list; blanks around entries and empty entries are dropped."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list):
            value = [k.strip() if isinstance(k, str) else k for k in value]
            return [k for k in value if k != ""]
        return value

    @field_validator("model_cache")
    @classmethod
    def _expand_cache(cls, value: Path) -> Path:
        return default_cache_dir() if value == DEFAULT_MODEL_CACHE else value.expanduser()
