"""A task's files read from a directory on the server's own disk, only from under the roots an operator allows.

vLLM's `POST /v1/load_lora_adapter` names a server-side path. Any path a caller names is resolved first (every
symlink followed, every `..` applied), and it must then lie inside one of the allowed roots, resolved the same
way; so must each file read from it (a file may be a symlink to elsewhere). Only the files an upload keeps are
read (`adapter_config.json`, `adapter_model.safetensors`, `template.json`, and the pickle that is refused by name),
never anything else the directory holds, and never more than `max_bytes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adapters_store.format import TASK_FILES, UploadTooLarge, read_upload


class PathRefused(PermissionError):
    """A path outside every allowed root, or no root allowed at all (API: 403)."""


class BadPath(ValueError):
    """A path that names no readable directory (API: 400)."""


def read_adapter_dir(path: str, roots: Sequence[str | Path], *, max_bytes: int) -> dict[str, bytes]:
    """The task files of the directory `path` (as `read_upload` keeps them), if it lies under one of `roots`."""
    if not roots:
        raise PathRefused("loading adapters from server paths is off: the server allows no adapter_roots")
    if not Path(path).is_absolute():
        raise BadPath(f"{path!r} is not an absolute path")
    allowed = [Path(root).resolve() for root in roots]
    try:
        folder = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        raise BadPath(f"{path!r} does not exist on the server") from None
    root = _root_of(folder, allowed, path)
    if not folder.is_dir():
        raise BadPath(f"{path!r} is not a directory")
    files: dict[str, bytes] = {}
    total = 0
    for name in sorted(TASK_FILES):
        entry = folder / name
        if not entry.exists():
            continue
        target = entry.resolve()
        if not target.is_relative_to(root):
            raise PathRefused(f"{path!r}: {name} points outside the allowed adapter roots")
        if not target.is_file():
            raise BadPath(f"{path!r}: {name} is not a file")
        total += target.stat().st_size
        if total > max_bytes:
            raise UploadTooLarge(f"{path!r} holds more than the upload limit of {max_bytes} bytes")
        files[name] = target.read_bytes()
    return read_upload(files, max_bytes=max_bytes)


def _root_of(folder: Path, roots: Sequence[Path], path: str) -> Path:
    for root in roots:
        if folder.is_relative_to(root):
            return root
    raise PathRefused(f"{path!r} is outside the allowed adapter roots")
