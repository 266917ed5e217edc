"""Turn what a caller wants to upload into checked bytes, before anything is sent.

A task can come from a `save_pretrained` directory, a `.tar.gz`/`.zip` of one, an in-memory `PeftModel`, a template
(a dict or a `.json` file) or a mapping of file names to bytes. Each is checked with the server's own file checks
(`adapters_store.format`), so a malformed adapter fails here with the same message, and nothing goes over the wire.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store.composite import COMPOSITE_FILE, COMPOSITE_KIND, inspect_composite
from adapters_store.format import (
    ARCHIVE_SUFFIXES,
    CONFIG_FILE,
    PICKLE_WEIGHTS_FILE,
    TEMPLATE_FILE,
    TEMPLATE_KIND,
    WEIGHTS_FILE,
    FormatError,
    InvalidTaskId,
    UploadTooLarge,
    inspect_peft,
    parse_template,
    read_upload,
    validate_task_id,
)
from clients.errors import InvalidAdapter, InvalidRequest, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "PreparedUpload",
    "UploadSource",
    "check_task_id",
    "prepare_template",
    "prepare_upload",
]

# A client-side bound on what we read into memory; the server applies its own (256 MiB by default, HTTP 413).
DEFAULT_MAX_UPLOAD_BYTES = 1 << 30
_TASK_FILES = (CONFIG_FILE, WEIGHTS_FILE, PICKLE_WEIGHTS_FILE, TEMPLATE_FILE, COMPOSITE_FILE)

UploadSource = str | os.PathLike[str] | Mapping[str, bytes] | Any  # Any: a peft.PeftModel (peft is not imported)


@dataclass(frozen=True)
class PreparedUpload:
    """Exactly one of `files` (multipart `files`), `archive` (multipart `archive`) or `template` (JSON) is set."""

    kind: str  # what the server will call it: lora, prefix_tuning, template, ...
    parameters: int
    bytes: int  # tensor bytes (0 for a template)
    files: dict[str, bytes] | None = None
    archive: tuple[str, bytes] | None = None  # (file name, content)
    template: dict[str, Any] | None = None
    description: str | None = None  # from a template file's own "description", if any

    @property
    def size(self) -> int:
        """Bytes that go over the wire (roughly, for a template)."""
        if self.files is not None:
            return sum(len(data) for data in self.files.values())
        if self.archive is not None:
            return len(self.archive[1])
        return len(json.dumps(self.template))


def check_task_id(task: str) -> str:
    """A valid, unreserved task id, or `InvalidRequest` (no request is made)."""
    try:
        return validate_task_id(task)
    except InvalidTaskId as exc:
        raise InvalidRequest(str(exc)) from None


def prepare_upload(source: UploadSource, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> PreparedUpload:
    """Read and check `source`; raise `InvalidAdapter` / `PayloadTooLarge` with the reason when it is not servable."""
    if _is_peft_model(source):
        return _from_peft_model(source, max_bytes)
    if isinstance(source, Mapping):
        return _checked(lambda: _from_files(dict(source), max_bytes))
    path = Path(os.fspath(source)).expanduser()
    where = str(path)
    if path.is_dir():
        return _checked(lambda: _from_files(_read_directory(path, max_bytes), max_bytes), where)
    if not path.exists():
        raise InvalidAdapter(f"{where}: no such file or directory")
    if not path.is_file():
        raise InvalidAdapter(f"{where}: not a regular file")
    name = path.name.lower()
    if name.endswith(ARCHIVE_SUFFIXES):
        return _checked(lambda: _from_archive(path.name, _read_file(path, max_bytes), max_bytes), where)
    if name.endswith(".json") and name != CONFIG_FILE:
        return _checked(lambda: _from_template_file(_read_file(path, max_bytes)), where)
    raise InvalidAdapter(
        f"{where}: expected a PEFT save_pretrained directory, a .tar.gz/.tgz/.zip of one, or a template .json"
    )


def prepare_template(template: Mapping[str, Any], description: str | None = None) -> PreparedUpload:
    """A template task checked like the server checks it (fields, at most 64 examples and 64 KiB)."""
    if not isinstance(template, Mapping):
        raise InvalidAdapter("a template must be a JSON object (system, instruction, examples, ...)")
    data = dict(template)
    _checked(lambda: parse_template(json.dumps(data).encode()))
    return PreparedUpload(kind=TEMPLATE_KIND, parameters=0, bytes=0, template=data, description=description)


def _checked(build, where: str | None = None):
    """Run `build`, turning the format checks' errors into the SDK's typed ones."""
    prefix = f"{where}: " if where else ""
    try:
        return build()
    except UploadTooLarge as exc:
        raise PayloadTooLarge(prefix + str(exc)) from None
    except FormatError as exc:
        raise InvalidAdapter(prefix + str(exc)) from None


def _from_files(files: dict[str, bytes], max_bytes: int) -> PreparedUpload:
    contents = read_upload(files, max_bytes=max_bytes)
    if COMPOSITE_FILE in contents:
        _, summary = inspect_composite(contents)
        return PreparedUpload(kind=COMPOSITE_KIND, parameters=summary.parameters, bytes=summary.bytes, files=contents)
    if CONFIG_FILE not in contents:
        return _from_template_file(contents[TEMPLATE_FILE])
    summary = inspect_peft(contents)
    return PreparedUpload(kind=summary.kind, parameters=summary.parameters, bytes=summary.bytes, files=contents)


def _from_archive(name: str, data: bytes, max_bytes: int) -> PreparedUpload:
    contents = read_upload(archive=data, max_bytes=max_bytes)
    if COMPOSITE_FILE in contents:
        _, summary = inspect_composite(contents)
        return PreparedUpload(
            kind=COMPOSITE_KIND, parameters=summary.parameters, bytes=summary.bytes, archive=(name, data)
        )
    if CONFIG_FILE not in contents:
        summary = _from_template_file(contents[TEMPLATE_FILE])
        return PreparedUpload(kind=summary.kind, parameters=0, bytes=0, archive=(name, data))
    summary = inspect_peft(contents)
    return PreparedUpload(kind=summary.kind, parameters=summary.parameters, bytes=summary.bytes, archive=(name, data))


def _from_template_file(data: bytes) -> PreparedUpload:
    """A template .json: the template itself, or `{"template": {...}, "description": ...}` as the API takes it."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"not valid JSON ({exc})") from None
    description = None
    if isinstance(body, dict) and isinstance(body.get("template"), dict):
        description = body.get("description")
        body = body["template"]
    if not isinstance(body, dict):
        raise FormatError("a template must be a JSON object (system, instruction, examples, ...)")
    parse_template(json.dumps(body).encode())
    return PreparedUpload(kind=TEMPLATE_KIND, parameters=0, bytes=0, template=body, description=description)


def _read_directory(path: Path, max_bytes: int) -> dict[str, bytes]:
    """The task files at the top of a save_pretrained directory (README.md and the like are not read); for a
    composite task (`task.json`), those of each component's folder too, as `<folder>/<file>`."""
    files = {}
    if (path / COMPOSITE_FILE).is_file():
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            files |= {f"{folder.name}/{name}": data for name, data in _read_directory(folder, max_bytes).items()}
    for name in _TASK_FILES:
        file = path / name
        if file.is_file():
            files[name] = _read_file(file, max_bytes)
    return files


def _read_file(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise UploadTooLarge(f"{path.name} is {size} bytes, over the client's upload limit of {max_bytes} bytes")
    return path.read_bytes()


def _is_peft_model(source: object) -> bool:
    return hasattr(source, "peft_config") and hasattr(source, "save_pretrained")


def _from_peft_model(model: Any, max_bytes: int) -> PreparedUpload:
    """save_pretrained the active adapter (safetensors) into a temporary directory and read it back."""
    adapter = model.active_adapter
    if not isinstance(adapter, str):
        raise InvalidAdapter("the PeftModel has several active adapters; activate the one to upload")
    with tempfile.TemporaryDirectory(prefix="taskserve-upload-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[adapter])
        # PEFT writes the adapter named "default" at the top and any other one in a folder of its name
        folder = Path(tmp) if (Path(tmp) / CONFIG_FILE).is_file() else Path(tmp) / adapter
        return _checked(lambda: _from_files(_read_directory(folder, max_bytes), max_bytes), "the PeftModel")
