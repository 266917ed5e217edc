"""Filesystem backend: one directory per task, one immutable directory per version, no locks.

Layout under `root`:

    tasks/<task_id>/v<N>/      the version's files + meta.json; appears complete (renamed in from tmp/)
    tasks/<task_id>/CURRENT    the current version number, replaced atomically
    floors/<task_id>           highest version a deleted task used, so numbers are never reused
    tmp/                       uploads being written, named after their writer (host, pid, process token): at
                               start and every minute, a dead writer's leftovers are removed; any other
                               leftover after an hour
    trash/                     deleted task dirs being removed
    CHANGES                    one JSON line per change (O_APPEND); watchers tail it instead of scanning

Safe for several processes (replicas on one host or a POSIX filesystem with atomic rename): rename(2)
refuses a non-empty target, so two concurrent puts can never both take v<N>; the loser retries N+1.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from adapters_store.base import (
    META_FILE,
    RECORD_ID,
    TASK_ID,
    AdapterStore,
    Artifact,
    Change,
    ChangeCallback,
    Page,
    RecordKind,
    StoreUnavailable,
    TaskInfo,
    TaskNotFound,
    TaskSummary,
    VersionInfo,
    VersionNotFound,
    Watch,
    check_files,
    check_limit,
    check_record_id,
    check_version,
    content_sha256,
    validate_task_id,
)
from adapters_store.changelog import ChangesTail, append_change

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
CHANGES = "CHANGES"
STALE_UPLOAD_S = 3600.0  # a tmp/ upload untouched this long belongs to a crashed writer
SWEEP_EVERY_S = 60.0
# who writes a staging dir: this host, this process, and this process's incarnation (pids are reused, and a
# container's server is pid 1 every time)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TOKEN = uuid.uuid4().hex[:8]
_STAGING = re.compile(r"put-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})-(?P<host>[0-9a-f]{8})-")


def _staging_prefix() -> str:
    return f"put-{os.getpid()}-{_TOKEN}-{_HOST}-"


def _writer_gone(name: str) -> bool:
    """Whether a staging dir's writer, on this host, has certainly exited."""
    match = _STAGING.match(name)
    if match is None or match["host"] != _HOST:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return match["token"] != _TOKEN  # a previous incarnation that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _version_of(name: str) -> int | None:
    if name.startswith("v") and name[1:].isdigit() and not name[1:].startswith("0"):
        return int(name[1:])
    return None


class DiskStore(AdapterStore):
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        durable: bool = True,
        poll_interval: float = 0.2,
        changes_max_bytes: int = 8 << 20,
    ) -> None:
        """`durable=False` skips fsync (tests, tmpfs); a crash may then lose recent puts but never tear one."""
        self.root = Path(root).expanduser().absolute()
        self._durable = durable
        self._poll_interval = poll_interval
        self._changes_max_bytes = changes_max_bytes
        self._tasks, self._floors = self.root / "tasks", self.root / "floors"
        self._tmp, self._trash = self.root / "tmp", self.root / "trash"
        self._changes = self.root / CHANGES
        self._watches: list[Watch] = []
        self._last_sweep = 0.0
        self._names: tuple[tuple[int, int, int], list[str]] | None = None  # (tasks/'s stat, its sorted ids)
        with self._os_errors():
            for d in (self._tasks, self._floors, self._tmp, self._trash):
                d.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r})"

    def _task_dir(self, task_id: str) -> Path:
        return self._tasks / _dir_name(task_id)

    def _floor_file(self, task_id: str) -> Path:
        return self._floors / _dir_name(task_id)

    # --- writes ----------------------------------------------------------------------------------

    def put(
        self,
        task_id: str,
        files: Mapping[str, bytes],
        *,
        kind: str,
        parameters: int,
        backbone: str,
        description: str | None = None,
    ) -> VersionInfo:
        validate_task_id(task_id)
        check_files(files)
        meta = {
            "kind": kind,
            "parameters": int(parameters),
            "bytes": sum(len(data) for data in files.values()),
            "sha256": content_sha256(files),
            "created_at": time.time(),
            "backbone": backbone,
            "description": description,
        }
        with self._os_errors():
            if time.monotonic() - self._last_sweep > SWEEP_EVERY_S:
                self._sweep()
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=self._tmp))
            try:
                for name, data in files.items():
                    self._write_file(staging / name, bytes(data))
                # meta.json marks a version complete: readers ignore a version dir without it
                self._write_file(staging / META_FILE, json.dumps({**meta, "files": sorted(files)}).encode())
                self._fsync_dir(staging)
                version = self._rename_in(task_id, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._write_current(task_id, version)
            self._notify(Change(task_id, "put", version))
        return VersionInfo(task_id=task_id, version=version, **meta)

    def _rename_in(self, task_id: str, staging: Path) -> int:
        """Move a complete staging dir to the first free v<N>; returns N."""
        task_dir = self._task_dir(task_id)
        version = self._next_version(task_id)
        for _ in range(10_000):
            task_dir.mkdir(exist_ok=True)
            try:
                os.rename(staging, task_dir / f"v{version}")
            except FileNotFoundError:  # a concurrent delete moved the task dir away: recreate it
                if not staging.exists():
                    raise
                continue
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version += 1  # another writer took v<N> first
                continue
            self._fsync_dir(task_dir)
            return version
        raise StoreUnavailable(f"could not allocate a version for task {task_id!r}")

    def _next_version(self, task_id: str) -> int:
        task_dir = self._task_dir(task_id)
        highest = self._read_int(self._floor_file(task_id)) or 0
        try:
            names = os.listdir(task_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            version = _version_of(name)
            if version is None:
                continue
            if not (task_dir / name / META_FILE).exists():
                # versions are renamed in complete, so one without meta.json is debris, never in progress
                log.info("removing incomplete version dir %s/%s", task_id, name)
                shutil.rmtree(task_dir / name, ignore_errors=True)
            highest = max(highest, version)
        return highest + 1

    def set_current(self, task_id: str, version: int) -> VersionInfo:
        validate_task_id(task_id)
        check_version(task_id, version)
        with self._os_errors():
            self._read_current(task_id)  # TaskNotFound first
            info = self._read_info(task_id, version)
            if info is None:
                raise VersionNotFound(f"task {task_id!r} has no version {version}")
            self._write_current(task_id, version)
            self._notify(Change(task_id, "current", version))
        return info

    def delete(self, task_id: str) -> None:
        validate_task_id(task_id)
        task_dir = self._task_dir(task_id)
        with self._os_errors():
            self._read_current(task_id)
            self._raise_floor(task_id, task_dir)
            trash = self._trash / f"{_dir_name(task_id)}.{uuid.uuid4().hex}"
            try:
                os.rename(task_dir, trash)  # the task disappears atomically; removal can take its time
            except FileNotFoundError:
                raise TaskNotFound(f"unknown task {task_id!r}") from None
            self._fsync_dir(self._tasks)
            self._raise_floor(task_id, trash)  # a put that landed while we were deleting
            self._notify(Change(task_id, "delete", None))
            shutil.rmtree(trash, ignore_errors=True)

    def _raise_floor(self, task_id: str, task_dir: Path) -> None:
        try:
            versions = [v for v in map(_version_of, os.listdir(task_dir)) if v is not None]
        except FileNotFoundError:
            return
        floor = self._read_int(self._floor_file(task_id)) or 0
        if versions and max(versions) > floor:
            self._atomic_write(self._floor_file(task_id), str(max(versions)).encode(), self._floors)

    def _write_current(self, task_id: str, version: int) -> None:
        task_dir = self._task_dir(task_id)
        if not (task_dir / f"v{version}" / META_FILE).exists():
            return  # deleted concurrently: the delete wins, never point CURRENT at nothing
        try:
            self._atomic_write(task_dir / CURRENT, str(version).encode(), task_dir)
        except FileNotFoundError:
            pass  # deleted concurrently, as above

    # --- access records ----------------------------------------------------------------------------

    def _record_file(self, kind: RecordKind, record_id: str) -> Path:
        return self.root / "access" / kind / f"{check_record_id(record_id)}.json"

    def put_record(self, kind: RecordKind, record_id: str, document: Mapping[str, object]) -> None:
        path = self._record_file(kind, record_id)
        with self._os_errors():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(path, json.dumps(dict(document), sort_keys=True).encode(), path.parent)

    def get_record(self, kind: RecordKind, record_id: str) -> dict | None:
        with self._os_errors():
            try:
                return json.loads(self._record_file(kind, record_id).read_bytes())
            except FileNotFoundError:
                return None

    def list_records(self, kind: RecordKind) -> list[dict]:
        folder = self.root / "access" / kind
        with self._os_errors():
            if not folder.is_dir():
                return []
            ids = sorted(n.removesuffix(".json") for n in os.listdir(folder) if n.endswith(".json"))
        return [r for r in (self.get_record(kind, i) for i in ids if RECORD_ID.fullmatch(i)) if r is not None]

    def delete_record(self, kind: RecordKind, record_id: str) -> bool:
        path = self._record_file(kind, record_id)
        with self._os_errors():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            self._fsync_dir(path.parent)
        return True

    # --- reads -----------------------------------------------------------------------------------

    def get(self, task_id: str, version: int | None = None) -> Artifact:
        validate_task_id(task_id)
        with self._os_errors():
            if version is None:
                version = self._read_current(task_id)
            check_version(task_id, version)
            vdir = self._task_dir(task_id) / f"v{version}"
            try:
                meta = json.loads((vdir / META_FILE).read_bytes())
                files = {name: (vdir / name).read_bytes() for name in meta["files"]}
            except FileNotFoundError:
                self._read_current(task_id)  # TaskNotFound if the task is gone
                raise VersionNotFound(f"task {task_id!r} has no version {version}") from None
        return Artifact(info=VersionInfo.from_dict(meta, task_id=task_id, version=version), files=files)

    def info(self, task_id: str) -> TaskInfo:
        validate_task_id(task_id)
        with self._os_errors():
            current = self._read_current(task_id)
            try:
                names = os.listdir(self._task_dir(task_id))
            except FileNotFoundError:
                raise TaskNotFound(f"unknown task {task_id!r}") from None
            numbers = sorted(v for v in map(_version_of, names) if v is not None)
            versions = tuple(i for i in (self._read_info(task_id, v) for v in numbers) if i is not None)
        if not any(v.version == current for v in versions):
            raise TaskNotFound(f"unknown task {task_id!r}")  # deleted while we were reading
        return TaskInfo(task_id=task_id, current=current, versions=versions)

    def list(self, *, after: str | None = None, limit: int = 100) -> Page:
        check_limit(limit)
        with self._os_errors():
            names = self._task_names()
            candidates = iter(names[bisect.bisect_right(names, after) if after is not None else 0 :])
            tasks = [s for s in self._summaries(candidates, limit)]
            more = next(self._summaries(candidates, 1), None) is not None
        return Page(tasks=tuple(tasks), next_after=tasks[-1].task_id if more and tasks else None)

    def _task_names(self) -> list[str]:
        """Every task id, sorted: read again only when `tasks/` changed, so a page costs its own tasks' reads.

        A directory's mtime moves when an entry is added, renamed or removed. A listing taken within a second of
        its last change is not reused (a filesystem with coarse timestamps could show two changes as one).
        """
        stat = os.stat(self._tasks)
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_nlink)
        cached = self._names
        if cached is not None and cached[0] == stamp:
            return cached[1]
        names = sorted(i for i in map(_task_id, os.listdir(self._tasks)) if TASK_ID.fullmatch(i))
        if time.time() - stat.st_mtime > 1.0:
            self._names = (stamp, names)
        return names

    def _summaries(self, names: Iterator[str], limit: int) -> Iterator[TaskSummary]:
        """Summaries for the visible tasks among `names`, at most `limit`; consumes only what it needs."""
        if limit <= 0:
            return
        for name in names:
            version = self._read_int(self._task_dir(name) / CURRENT)
            info = self._read_info(name, version) if version is not None else None
            if info is None:
                continue  # a crashed first upload or a concurrent delete: not a task
            yield TaskSummary(task_id=name, current=info)
            limit -= 1
            if limit == 0:
                return

    def _read_current(self, task_id: str) -> int:
        version = self._read_int(self._task_dir(task_id) / CURRENT)
        if version is None:
            raise TaskNotFound(f"unknown task {task_id!r}")
        return version

    def _read_info(self, task_id: str, version: int) -> VersionInfo | None:
        try:
            meta = json.loads((self._task_dir(task_id) / f"v{version}" / META_FILE).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None
        return VersionInfo.from_dict(meta, task_id=task_id, version=version)

    @staticmethod
    def _read_int(path: Path) -> int | None:
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, NotADirectoryError):
            return None

    # --- notifications and lifecycle ---------------------------------------------------------------

    def watch(self, callback: ChangeCallback, *, on_resync: Callable[[], None] | None = None) -> Watch:
        watch = ChangesTail(self._changes, self._poll_interval, callback, on_resync).start()
        self._watches.append(watch)
        return watch

    def _notify(self, change: Change) -> None:
        append_change(self._changes, self._changes_max_bytes, change)

    def ping(self) -> None:
        if not self._tasks.is_dir() or not os.access(self._tasks, os.R_OK | os.W_OK | os.X_OK):
            raise StoreUnavailable(f"disk store {self.root} is missing or not writable")

    def close(self) -> None:
        for watch in self._watches:
            watch.close()
        self._watches.clear()

    def _sweep(self) -> None:
        """Remove crashed uploads (a dead writer's at once, any other after an hour) and half-removed deletes."""
        self._last_sweep = time.monotonic()
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._tmp):
                with contextlib.suppress(OSError):
                    if _writer_gone(entry.name) or now - entry.stat(follow_symlinks=False).st_mtime > STALE_UPLOAD_S:
                        log.info("removing a crashed upload's staging dir %s", entry.path)
                        shutil.rmtree(entry.path, ignore_errors=True)
            for entry in os.scandir(self._trash):
                shutil.rmtree(entry.path, ignore_errors=True)

    # --- file helpers ------------------------------------------------------------------------------

    def _write_file(self, path: Path, data: bytes) -> None:
        with open(path, "xb") as f:
            f.write(data)
            if self._durable:
                f.flush()
                os.fsync(f.fileno())

    def _atomic_write(self, path: Path, data: bytes, directory: Path) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        try:
            self._write_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fsync_dir(directory)

    def _fsync_dir(self, path: Path) -> None:
        if not self._durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _os_errors(self) -> Iterator[None]:
        """An unexpected OSError (disk full, I/O error, root gone) means the store cannot serve now."""
        try:
            yield
        except OSError as e:
            raise StoreUnavailable(f"disk store {self.root}: {e}") from e


def _dir_name(task_id: str) -> str:
    """One directory per task: a namespace's `/` becomes `~`, which no task id holds."""
    return task_id.replace("/", "~")


def _task_id(dir_name: str) -> str:
    return dir_name.replace("~", "/")
