"""The project's one inter-process file lock (the `filelock` package: flock on Unix, which Linux also
carries across NFS clients). The kernel releases it when its process dies, so a killed run never leaves
a stale lock."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import filelock


class LockBusy(RuntimeError):
    """Another process holds the lock (a try with wait=False); `holder` is its note, or a placeholder."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: locked by {holder}")
        self.path, self.holder = path, holder


def holder_note() -> str:
    """Who holds a lock, for the message of the process that finds it busy: pid, host, start, command."""
    return f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: " + " ".join(sys.argv)


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True, on_wait: Callable[[], object] | None = None,
              note: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created, with its folder, if missing).

    When another process holds it: wait=True calls `on_wait` once, then blocks until it is free;
    wait=False raises LockBusy at once, naming the holder by its `note` (a line the holder keeps in the
    lock file while it holds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if not wait:
            holder = ""
            with contextlib.suppress(FileNotFoundError):  # released (and removed) since
                holder = path.read_text().strip()
            raise LockBusy(path, holder or "a process that has not written its name yet") from None
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        if note is not None:
            path.write_text(note + "\n")  # another descriptor: closing it keeps the flock, which is per open file
        yield
    finally:
        if note is not None:
            path.write_text("")
        lock.release()
