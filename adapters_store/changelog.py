"""The disk store's change log: one JSON line per change, appended by any process, tailed by watchers.

Tailing one file costs a stat and a read per poll however many tasks there are; diffing the task
tree would cost a stat per task.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from adapters_store.base import Change, ChangeCallback, Watch

log = logging.getLogger(__name__)


def append_change(path: Path, max_bytes: int, change: Change) -> None:
    """Append `change`; past `max_bytes` start a new file (watchers follow it and call on_resync)."""
    # one write(2) of a short line with O_APPEND: concurrent writers never interleave within a line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (change.to_json() + "\n").encode())
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > max_bytes:
        fresh = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        fresh.touch()
        os.replace(fresh, path)  # a notification log needs no fsync: a lost line costs a resync at most


class ChangesTail(Watch):
    """Polls the log: new lines become callbacks; a replaced file is drained, then followed."""

    def __init__(
        self, path: Path, interval: float, callback: ChangeCallback, on_resync: Callable[[], None] | None
    ) -> None:
        super().__init__(f"taskserve-store-watch:{path.parent}", callback, on_resync)
        self._path, self._interval = path, interval
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        self._partial = b""
        self._open(at_end=True)  # opened now, so changes made right after watch() returns are seen

    def _open(self, *, at_end: bool) -> None:
        try:
            self._file = open(self._path, "rb")  # held open across polls
        except FileNotFoundError:
            self._file, self._inode = None, None
            return
        if at_end:
            self._file.seek(0, os.SEEK_END)
        self._inode = os.fstat(self._file.fileno()).st_ino
        self._partial = b""

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                self._poll()
        finally:
            if self._file is not None:
                self._file.close()

    def _poll(self) -> None:
        if self._file is None:
            self._open(at_end=False)  # the log appeared after we started: everything in it is new
            if self._file is None:
                return
        try:
            inode = os.stat(self._path).st_ino
        except FileNotFoundError:
            inode = None
        # drain after the stat: whatever a writer appended before rotating is read before we move on
        self._drain()
        if inode != self._inode:
            self._file.close()
            self._open(at_end=False)
            if self._file is not None:
                self._drain()
            self._resync()

    def _drain(self) -> None:
        assert self._file is not None
        data = self._file.read()
        if not data:
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                change = Change.from_json(line)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed line in %s: %r", self._path, line[:200])
                continue
            self._deliver(change)
