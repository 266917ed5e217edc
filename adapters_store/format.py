"""The upload format: what a client may send as a task, checked without loading a single tensor.

One code path for the server's upload endpoint and the clients' pre-flight checks. Nothing here
unpickles, imports torch, or trusts a size an archive declares: archives are read as streams and
every decompressed byte is counted against `max_bytes`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters_store import kinds
from adapters_store.base import InvalidTaskId, validate_task_id

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "TEMPLATE_FILE",
    "TEMPLATE_KIND",
    "FormatError",
    "UploadTooLarge",
    "InvalidTaskId",
    "PeftSummary",
    "Template",
    "TemplateExample",
    "read_upload",
    "inspect_peft",
    "parse_template",
    "parse_prompt_format",
    "validate_task_id",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
TEMPLATE_FILE = "template.json"
TEMPLATE_KIND = kinds.TEMPLATE.name
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")

FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # safetensors dtype -> bytes per element

MAX_MEMBERS = 1000  # archive entries; bounds header parsing however small the files are
MAX_HEADER_BYTES = 1 << 20  # a LoRA on every linear of a 70B model needs ~200 kB; padding past this is refused
MAX_EXAMPLES = 64
MAX_TEMPLATE_BYTES = 64 << 10

_PICKLE_HINT = "pickle weights are never loaded; re-save with save_pretrained(..., safe_serialization=True)"
COMPOSITE_FILE = "task.json"  # a composite task's manifest (adapters_store/composite.py)
_FLAT_MEMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.adapter_(config\.json|model\.safetensors)")
TASK_FILES = {CONFIG_FILE, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE, TEMPLATE_FILE, COMPOSITE_FILE}


class FormatError(ValueError):
    """The upload is not something we serve; the message says what to send instead (API: 400/422)."""


class UploadTooLarge(FormatError):
    """The upload, or what it decompresses to, is over the size limit (API: 413)."""


# --- reading an upload ---------------------------------------------------------------------------


def read_upload(
    files: Mapping[str, bytes] | None = None, archive: bytes | None = None, *, max_bytes: int
) -> dict[str, bytes]:
    """The task files in an upload: {adapter_config.json, adapter_model.safetensors} (and optionally the adapter's
    prompt format, template.json), or {template.json} alone (a template task).

    `files` are a `save_pretrained` directory's files (names may carry one folder, README.md and the
    like are ignored; a single `.tar.gz`/`.tgz`/`.zip` entry is treated as `archive`); `archive` is
    one such archive. The content is not validated here: see `inspect_peft` and `parse_template`.
    """
    if (files is None) == (archive is None):
        raise FormatError("send either the files of a PEFT save_pretrained directory or one archive of it")
    if files is not None and len(files) == 1:
        [(name, data)] = files.items()
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            files, archive = None, data
    if archive is not None:
        return _select(_read_archive(bytes(archive), max_bytes))
    assert files is not None
    entries: dict[str, bytes] = {}
    total = 0
    for name, data in files.items():
        total += len(data)
        _check_size(name, len(data), total, max_bytes)
        _add(entries, _safe_path(name), bytes(data))
    return _select(entries)


def _check_size(name: str, size: int, total: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise UploadTooLarge(f"{name!r} is {size} bytes, over the upload limit of {max_bytes} bytes")
    if total > max_bytes:
        raise UploadTooLarge(f"the upload unpacks to more than the limit of {max_bytes} bytes")


def _safe_path(name: str) -> str:
    """A member name as a relative posix path; refuses anything that could point outside the upload."""
    path = name.replace("\\", "/")
    if "\0" in path:
        raise FormatError(f"member name {name!r} contains a NUL byte")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise FormatError(f"member {name!r} has an absolute path; archive the adapter directory with relative paths")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"member {name!r} points outside the archive ('..'); archive the directory itself")
    return "/".join(parts)


def _add(entries: dict[str, bytes], path: str, data: bytes) -> None:
    if path in entries:
        raise FormatError(f"the upload holds {path!r} twice")
    entries[path] = data


def _select(entries: Mapping[str, bytes]) -> dict[str, bytes]:
    """Find the one directory holding a task and keep only the files we serve from it."""
    if any(path.rpartition("/")[2] == COMPOSITE_FILE for path in entries):
        from adapters_store.composite import select_composite  # it builds on this module

        return select_composite(entries)
    dirs: dict[str, dict[str, bytes]] = {}
    for path, data in entries.items():
        folder, _, base = path.rpartition("/")
        if base in TASK_FILES:
            dirs.setdefault(folder, {})[base] = data
    if not dirs:
        raise FormatError(
            f"no {CONFIG_FILE} in the upload: send the files of a PEFT save_pretrained directory "
            f"({CONFIG_FILE} and {WEIGHTS_FILE}) or a {TEMPLATE_FILE}"
        )
    if len(dirs) > 1:
        names = ", ".join(repr(d or ".") for d in sorted(dirs))
        raise FormatError(f"the upload holds more than one candidate directory ({names}); upload one task at a time")
    [found] = dirs.values()
    if TEMPLATE_FILE in found and not found.keys() & {CONFIG_FILE, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE}:
        return {TEMPLATE_FILE: found[TEMPLATE_FILE]}
    if WEIGHTS_FILE not in found:
        if PICKLE_WEIGHTS_FILE in found:
            raise FormatError(f"{PICKLE_WEIGHTS_FILE} is not accepted: {_PICKLE_HINT}")
        raise FormatError(f"the upload lacks {WEIGHTS_FILE} (send the files of a PEFT save_pretrained directory)")
    if CONFIG_FILE not in found:
        raise FormatError(f"the upload lacks {CONFIG_FILE} (send the files of a PEFT save_pretrained directory)")
    kept = {CONFIG_FILE: found[CONFIG_FILE], WEIGHTS_FILE: found[WEIGHTS_FILE]}
    if TEMPLATE_FILE in found:  # the adapter's prompt format (see `parse_prompt_format`)
        kept[TEMPLATE_FILE] = found[TEMPLATE_FILE]
    return kept


def _wanted(path: str) -> bool:
    """Whether an archive member may be a task file (a composite's may be stored flat: `lora.adapter_config.json`)."""
    base = path.rpartition("/")[2]
    return base in TASK_FILES or _FLAT_MEMBER.fullmatch(base) is not None


def _read_archive(archive: bytes, max_bytes: int) -> dict[str, bytes]:
    if len(archive) > max_bytes:
        raise UploadTooLarge(f"the archive is {len(archive)} bytes, over the upload limit of {max_bytes} bytes")
    if archive[:2] == b"\x1f\x8b":
        return _read_tar_gz(archive, max_bytes)
    if archive[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _read_zip(archive, max_bytes)
    raise FormatError(
        "the archive is neither a .tar.gz/.tgz nor a .zip; archive the save_pretrained directory with "
        "`tar czf adapter.tar.gz DIR` or `zip -r adapter.zip DIR`, or send its files directly"
    )


class _Budget(io.RawIOBase):
    """A read-only stream that refuses to produce more than `limit` bytes: archive headers can lie."""

    def __init__(self, inner: io.BufferedIOBase, limit: int) -> None:
        self._inner, self._left = inner, limit

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(self._left + 1 if size < 0 else min(size, self._left + 1))
        self._left -= len(data)
        if self._left < 0:
            raise UploadTooLarge("the archive unpacks to more than the upload limit")
        return data


def _read_tar_gz(archive: bytes, max_bytes: int) -> dict[str, bytes]:
    entries: dict[str, bytes] = {}
    total = 0
    # headers and padding: at most a few blocks per member on top of the file data
    stream = _Budget(gzip.GzipFile(fileobj=io.BytesIO(archive)), max_bytes + MAX_MEMBERS * 4096)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise FormatError(f"the archive has more than {MAX_MEMBERS} members")
                path = _safe_path(member.name)
                if member.isdir():
                    continue
                if not member.isreg() or member.issparse():
                    what = "a symlink" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
                    raise FormatError(f"archive member {member.name!r} is {what}; only regular files are accepted")
                total += member.size
                _check_size(member.name, member.size, total, max_bytes)
                if not _wanted(path):
                    continue
                extracted = tar.extractfile(member)
                assert extracted is not None
                data = extracted.read(member.size + 1)
                if len(data) != member.size:
                    raise FormatError(f"archive member {member.name!r} is truncated")
                _add(entries, path, data)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise FormatError(f"the .tar.gz archive cannot be read ({e}); re-create it with `tar czf`") from e
    return entries


def _read_zip(archive: bytes, max_bytes: int) -> dict[str, bytes]:
    entries: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise FormatError(f"the archive has more than {MAX_MEMBERS} members")
            declared = 0
            for info in infos:  # declared sizes first: refuse an obvious bomb before inflating anything
                path = _safe_path(info.filename)
                mode = info.external_attr >> 16
                if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                    raise FormatError(f"archive member {info.filename!r} is {what}; only regular files are accepted")
                if info.flag_bits & 0x1:
                    raise FormatError(f"archive member {info.filename!r} is encrypted; send an unencrypted zip")
                declared += info.file_size
                _check_size(info.filename, info.file_size, declared, max_bytes)
            actual = 0
            for info in infos:
                path = _safe_path(info.filename)
                if info.is_dir() or not _wanted(path):
                    continue
                with zf.open(info) as member:
                    data = member.read(max_bytes - actual + 1)  # counted, whatever the header claims
                actual += len(data)
                _check_size(info.filename, len(data), actual, max_bytes)
                _add(entries, path, data)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
        raise FormatError(f"the .zip archive cannot be read ({e}); re-create it with `zip -r`") from e
    return entries


# --- PEFT adapters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeftSummary:
    peft_type: str  # as in adapter_config.json, e.g. "LORA"
    kind: str  # our name, from the kinds table (adapters_store.kinds): "lora", "prefix_tuning", ...
    parameters: int  # sum of numel over the tensors
    bytes: int  # tensor data bytes (what the adapter occupies once loaded at its stored dtype)
    config: dict[str, Any]  # adapter_config.json as parsed


def inspect_peft(files: Mapping[str, bytes]) -> PeftSummary:
    """Check a PEFT upload's config and safetensors header; count its parameters. No tensor is read.

    Catches malformed or hostile files early and cheaply. It does NOT check the values (NaN/Inf) or
    whether the tensors fit the backbone (shapes, target modules): the server does that with the
    model when it materialises the adapter.
    """
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise FormatError(f"the upload lacks {name} (send the files of a PEFT save_pretrained directory)")
    try:
        config = json.loads(files[CONFIG_FILE])
    except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep to parse
        raise FormatError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise FormatError(f"{CONFIG_FILE} must be a JSON object with a string peft_type")
    peft_type = config["peft_type"]
    kind = kinds.by_peft_type(peft_type)
    if kind is None:
        served = ", ".join(kinds.served_peft_types())
        raise FormatError(f"peft_type {peft_type!r} is not served; served types: {served}")
    parameters, nbytes = _inspect_safetensors(files[WEIGHTS_FILE])
    if TEMPLATE_FILE in files:
        parse_prompt_format(files[TEMPLATE_FILE])
    return PeftSummary(peft_type=peft_type, kind=kind.name, parameters=parameters, bytes=nbytes, config=config)


def _inspect_safetensors(data: bytes) -> tuple[int, int]:
    """(parameters, data bytes) from the header; the layout must tile the data exactly, like safetensors asks."""
    where = WEIGHTS_FILE
    if len(data) < 8:
        raise FormatError(f"{where} is too short to be a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise FormatError(f"{where}: the header length {header_len} does not fit the file ({len(data)} bytes)")
    if header_len > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: the header is {header_len} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep to parse
        raise FormatError(f"{where}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: the header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise FormatError(f"{where}: __metadata__ must be an object")
    if not header:
        raise FormatError(f"{where} holds no tensors")
    buffer = len(data) - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    parameters = 0
    for name, tensor in header.items():
        begin, end, numel = _check_tensor(name, tensor, buffer)
        spans.append((begin, end, name))
        parameters += numel
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise FormatError(f"{where}: tensor {name!r} {problem}")
        position = end
    if position != buffer:
        raise FormatError(f"{where}: the tensors cover {position} bytes but the file holds {buffer} after the header")
    return parameters, buffer


def _check_tensor(name: str, tensor: object, buffer: int) -> tuple[int, int, int]:
    where = f"{WEIGHTS_FILE}: tensor {name!r}"
    if not isinstance(tensor, dict):
        raise FormatError(f"{where} is not described by an object")
    dtype, shape, offsets = tensor.get("dtype"), tensor.get("shape"), tensor.get("data_offsets")
    if dtype not in FLOAT_DTYPES:
        raise FormatError(f"{where} has dtype {dtype!r}; adapter tensors must be one of {', '.join(FLOAT_DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= buffer
    ):
        raise FormatError(f"{where} has data offsets {offsets!r} outside the data ({buffer} bytes)")
    numel = math.prod(shape)
    if offsets[1] - offsets[0] != numel * FLOAT_DTYPES[dtype]:
        raise FormatError(f"{where}: shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} bytes")
    return offsets[0], offsets[1], numel


# --- templates (zero-parameter tasks) ----------------------------------------------------------------


class TemplateExample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    output: str


class Template(BaseModel):
    """A discrete prompt: instruction and few-shot examples placed before the user's input.

    The text before the input never depends on it, so the server can prefill its KV once per task.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str | None = None
    instruction: str | None = None
    examples: list[TemplateExample] = Field(default_factory=list, max_length=MAX_EXAMPLES)
    input_prefix: str = ""
    input_suffix: str = ""
    chat: bool = False  # True: render_messages() and the tokenizer's chat template

    def render(self, user_input: str) -> tuple[str, str]:
        """(leading text independent of the input, the rest including the input) for a plain LM."""
        if self.chat:
            raise ValueError("this is a chat template: use render_messages() and the tokenizer's chat template")
        parts = [part + "\n\n" for part in (self.system, self.instruction) if part]
        parts += [self._wrap(ex.input) + ex.output + "\n\n" for ex in self.examples]
        return "".join(parts), self._wrap(user_input)

    def render_messages(self, user_input: str) -> list[dict[str, str]]:
        """Chat messages: system (+ instruction), the examples as user/assistant turns, then the input."""
        if not self.chat:
            raise ValueError("this is a plain-text template: use render()")
        system = "\n\n".join(part for part in (self.system, self.instruction) if part)
        messages = [{"role": "system", "content": system}] if system else []
        for ex in self.examples:
            messages += [{"role": "user", "content": self._wrap(ex.input)}, {"role": "assistant", "content": ex.output}]
        messages.append({"role": "user", "content": self._wrap(user_input)})
        return messages

    def _wrap(self, text: str) -> str:
        return self.input_prefix + text + self.input_suffix


def parse_template(data: bytes) -> Template:
    """Validate a template.json (at most 64 KiB and 64 examples)."""
    if len(data) > MAX_TEMPLATE_BYTES:
        raise UploadTooLarge(f"{TEMPLATE_FILE} is {len(data)} bytes; templates are limited to {MAX_TEMPLATE_BYTES}")
    try:
        return Template.model_validate_json(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'template'}: {err['msg']}" for err in e.errors())
        raise FormatError(f"{TEMPLATE_FILE} is invalid: {problems}") from None


def parse_prompt_format(data: bytes) -> Template:
    """A template.json beside an adapter: only the text around each input (`input_prefix`, `input_suffix`), as the
    adapter was trained, e.g. `{"input_suffix": "\\n"}` for a model trained on `input + "\\n" + output`."""
    template = parse_template(data)
    if template.chat or template.system or template.instruction or template.examples:
        raise FormatError(
            f"{TEMPLATE_FILE} beside an adapter sets only input_prefix and input_suffix (the text around each input, "
            "as the adapter was trained); an instruction, examples or a chat template make a template task of their own"
        )
    return template
