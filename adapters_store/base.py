"""The store's contract: identities, artifact types, errors, and the `AdapterStore` interface.

Backends (disk, Redis) implement `AdapterStore`; the server picks one with `open_store(url)` at
start-up. This module imports nothing heavy so the engine and the clients can use the types freely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from adapters_store.buckets import Buckets, LocalBuckets

log = logging.getLogger(__name__)

TASK_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAMESPACE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # a tenant's: `team-a/summarise` is in namespace `team-a`
TASK_ID = re.compile(rf"(?:{NAMESPACE.pattern}/)?{TASK_NAME}")
BASE_TASK = "base"  # names the bare backbone in requests
RESERVED_TASK_IDS = frozenset({BASE_TASK})
# Stored file names follow the task-name rule too: no path separators, no hidden files.
FILE_NAME = re.compile(TASK_NAME)
META_FILE = "meta.json"  # reserved: the disk backend keeps a version's VersionInfo there
MAX_PAGE = 1000


RecordKind = Literal["keys", "tenants"]
RECORD_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # a key's digest (hex) or a tenant's namespace


def check_record_id(record_id: str) -> str:
    if not isinstance(record_id, str) or RECORD_ID.fullmatch(record_id) is None:
        raise ValueError(f"invalid record id {record_id!r}: it must match {RECORD_ID.pattern}")
    return record_id


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or cannot take the operation now (API: 503)."""


class TaskNotFound(StoreError, KeyError):
    """No such task (API: 404)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "task not found"


class VersionNotFound(StoreError, KeyError):
    """The task exists but not that version (API: 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "version not found"


class InvalidTaskId(StoreError, ValueError):
    """A task id that does not match `TASK_ID` or is reserved (API: 400)."""


def validate_task_id(task_id: str) -> str:
    """Return `task_id` if it is a valid, unreserved task id; raise `InvalidTaskId` otherwise."""
    if not isinstance(task_id, str) or TASK_ID.fullmatch(task_id) is None:
        raise InvalidTaskId(
            f"invalid task id {task_id!r}: it must be NAME or NAMESPACE/NAME, NAME matching {TASK_NAME} "
            f"and NAMESPACE {NAMESPACE.pattern}"
        )
    if task_id in RESERVED_TASK_IDS:
        raise InvalidTaskId(f"task id {task_id!r} is reserved (it names the bare backbone)")
    return task_id


def namespace_of(task_id: str) -> str | None:
    """`team-a` for `team-a/summarise`; None for a task outside any namespace."""
    namespace, slash, _ = task_id.partition("/")
    return namespace if slash else None


def check_version(task_id: str, version: int) -> int:
    """Versions are positive ints; anything else cannot exist."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise VersionNotFound(f"task {task_id!r} has no version {version!r}")
    return version


def check_files(files: Mapping[str, bytes]) -> None:
    """A version's files: a non-empty flat mapping of safe names to bytes (backends store them as-is)."""
    if not files:
        raise ValueError("a version needs at least one file")
    for name, data in files.items():
        if not isinstance(name, str) or FILE_NAME.fullmatch(name) is None or name == META_FILE:
            raise ValueError(f"invalid file name {name!r}: it must match {FILE_NAME.pattern} and not be {META_FILE}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"file {name!r} must be bytes, not {type(data).__name__}")


def content_sha256(files: Mapping[str, bytes]) -> str:
    """Digest of a canonical file set: sha256 over the sorted (name, sha256(data)) pairs.

    Independent of dict order and of how a backend lays the files out, so two replicas (or a client
    that kept its upload) can compare versions without moving the bytes.
    """
    outer = hashlib.sha256()
    for name in sorted(files):
        outer.update(name.encode())
        outer.update(b"\0")
        outer.update(hashlib.sha256(files[name]).hexdigest().encode())
        outer.update(b"\n")
    return outer.hexdigest()


@dataclass(frozen=True, order=True, slots=True)
class AdapterKey:
    """The identity of one task version: what every cache keys on. Versions are immutable, so a key names
    exactly one set of weights, and a new upload gets a new key."""

    task_id: str
    version: int

    def __str__(self) -> str:  # logs, and the `task@version` a response reports
        return f"{self.task_id}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> AdapterKey:
        """`task@version` as a user writes it (query strings); raises ValueError otherwise."""
        task_id, _, number = text.rpartition("@")
        if not task_id or not number.isdigit() or int(number) < 1:
            raise ValueError(f"{text!r} is not task@version")
        return cls(task_id, int(number))


@dataclass(frozen=True)
class VersionInfo:
    """One immutable version of a task. `(task_id, version)` is never reused, even after a delete."""

    task_id: str
    version: int
    kind: str  # "lora", "prefix_tuning", ..., "template"
    parameters: int  # trainable scalars (0 for templates)
    bytes: int  # total size of the stored files
    sha256: str  # content_sha256 of the file set
    created_at: float  # unix seconds
    backbone: str  # fingerprint of the backbone the server validated this version against
    description: str | None = None

    @property
    def key(self) -> AdapterKey:
        return AdapterKey(self.task_id, self.version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, fields: Mapping[str, object], **override: object) -> VersionInfo:
        """Ignores unknown fields, so a replica can read what a newer one wrote during a rolling upgrade."""
        known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, **override})  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: str | bytes, **override: object) -> VersionInfo:
        return cls.from_dict(json.loads(data), **override)


@dataclass(frozen=True)
class TaskInfo:
    task_id: str
    current: int
    versions: tuple[VersionInfo, ...]  # ascending by version

    @property
    def current_info(self) -> VersionInfo:
        return next(v for v in self.versions if v.version == self.current)


@dataclass(frozen=True)
class Artifact:
    """A version's files, e.g. {"adapter_config.json", "adapter_model.safetensors"} or {"template.json"}."""

    info: VersionInfo
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class TaskSummary:
    task_id: str
    current: VersionInfo


@dataclass(frozen=True)
class Page:
    tasks: tuple[TaskSummary, ...]
    next_after: str | None  # pass as `after` for the next page; None: this was the last page


@dataclass(frozen=True)
class Change:
    """A notification: `version` is the new current for "put"/"current", None for "delete"."""

    task_id: str
    kind: Literal["put", "current", "delete"]
    version: int | None

    def to_json(self) -> str:
        return json.dumps({"task_id": self.task_id, "kind": self.kind, "version": self.version})

    @classmethod
    def from_json(cls, data: str | bytes) -> Change:
        raw = json.loads(data)
        if raw.get("kind") not in ("put", "current", "delete"):
            raise ValueError(f"unknown change kind {raw.get('kind')!r}")
        return cls(task_id=str(raw["task_id"]), kind=raw["kind"], version=raw.get("version"))


ChangeCallback = Callable[[Change], None]


class Watch(ABC):
    """A running change subscription: a daemon thread calling `callback` for every change.

    Delivery is best effort (at most once): changes made while a watcher is disconnected are not
    replayed. `on_resync` is called when that may have happened (a reconnect, a rotated log) so the
    owner can reconcile with `info`/`list`.
    """

    def __init__(self, name: str, callback: ChangeCallback, on_resync: Callable[[], None] | None = None) -> None:
        self._callback = callback
        self._on_resync = on_resync
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._guarded_run, name=name, daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _deliver(self, change: Change) -> None:
        try:
            self._callback(change)
        except Exception:  # a broken callback must not end the subscription
            log.exception("change callback failed for %s", change)

    def _resync(self) -> None:
        if self._on_resync is None:
            return
        try:
            self._on_resync()
        except Exception:
            log.exception("resync callback failed")

    def _guarded_run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("store watcher %s died", self._thread.name)

    @abstractmethod
    def _run(self) -> None:
        """Loop until `self._stop` is set, calling `self._deliver` for each change."""


class AdapterStore(ABC):
    """Versioned, immutable task artifacts shared by every server replica.

    put() creates version max+1 and makes it current, all or nothing; versions never change and their
    numbers are never reused. Errors: `InvalidTaskId`, `TaskNotFound`, `VersionNotFound`,
    `StoreUnavailable` (all `StoreError`).
    """

    @abstractmethod
    def put(
        self,
        task_id: str,
        files: Mapping[str, bytes],
        *,
        kind: str,
        parameters: int,
        backbone: str,
        description: str | None = None,
    ) -> VersionInfo: ...

    @abstractmethod
    def get(self, task_id: str, version: int | None = None) -> Artifact:
        """The given version's files and info; the current version when `version` is None."""

    @abstractmethod
    def info(self, task_id: str) -> TaskInfo: ...

    @abstractmethod
    def list(self, *, after: str | None = None, limit: int = 100) -> Page:
        """Tasks with an id greater than `after`, ascending, at most `limit` (<= MAX_PAGE)."""

    @abstractmethod
    def delete(self, task_id: str) -> None:
        """Remove the task and all its versions."""

    @abstractmethod
    def set_current(self, task_id: str, version: int) -> VersionInfo:
        """Point the task at an existing version (rollback or roll forward)."""

    @abstractmethod
    def watch(self, callback: ChangeCallback, *, on_resync: Callable[[], None] | None = None) -> Watch:
        """Call `callback(change)` on a background thread for changes made by any process sharing the store."""

    # --- access records: tenants and API keys (small JSON documents, few, shared by every replica) -------

    @abstractmethod
    def put_record(self, kind: RecordKind, record_id: str, document: Mapping[str, object]) -> None:
        """Create or replace one record, atomically."""

    @abstractmethod
    def get_record(self, kind: RecordKind, record_id: str) -> dict | None: ...

    @abstractmethod
    def list_records(self, kind: RecordKind) -> list[dict]:
        """Every record of `kind`, in id order."""

    @abstractmethod
    def delete_record(self, kind: RecordKind, record_id: str) -> bool:
        """Remove one record; False if there was none."""

    def rate_buckets(self) -> Buckets:
        """Where the quotas' token buckets are counted: in this process, unless the store is shared by replicas."""
        return LocalBuckets()

    @abstractmethod
    def ping(self) -> None:
        """Raise `StoreUnavailable` unless the backend answers."""

    @abstractmethod
    def close(self) -> None: ...

    def iter_tasks(self, *, page_size: int = 500) -> Iterator[TaskSummary]:
        """Every task, ascending, one page at a time."""
        after: str | None = None
        while True:
            page = self.list(after=after, limit=page_size)
            yield from page.tasks
            if page.next_after is None:
                return
            after = page.next_after

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be an int between 1 and {MAX_PAGE}, got {limit!r}")
    return limit


def redacted(url: str) -> str:
    """A store URL safe to log: a password (`redis://user:PASSWORD@host`, `?password=`) becomes ***."""
    url = re.sub(r"//[^@/]*@", "//***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def open_store(url: str) -> AdapterStore:
    """The backend named by `url`: "file://PATH" (relative or absolute) or "redis://HOST:PORT/DB"."""
    if url.startswith("file://"):
        from adapters_store.disk import DiskStore

        path = url.removeprefix("file://")
        if not path:
            raise ValueError("file:// store URL needs a path, e.g. file:///var/lib/taskserve or file://data/store")
        return DiskStore(path)
    if url == "memory://":
        from adapters_store.memory import MemoryStore

        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from adapters_store.redis import RedisStore

        return RedisStore(url)
    raise ValueError(
        f"unsupported store URL {url!r}: use file://PATH (relative or absolute) or redis://HOST:PORT/DB "
        "(also rediss:// and unix://), or memory:// for one process"
    )
