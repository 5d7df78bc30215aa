"""Folders a command writes as a whole (an audit bundle, a merged checkpoint, a benchmark's work folder).

Such a command may replace only a folder it made itself: `--out runs/tiny` (the training run) or
`--out ..` is refused before anything is deleted. A folder counts as made by `maker` when it holds the
MARKER file naming it, or when the command's own test `made(folder)` says so (an audit bundle is known by
its manifest). `replacing` builds the new folder beside the old one under a temporary name and swaps it
in at the end, so an interrupted command leaves the old folder or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from core.items import DataError

MARKER = ".made_by"  # one line: the command that made the folder


class FolderRefused(DataError):
    """A command was asked to replace or write into a folder it did not make, or one that holds its inputs."""


def made_by(folder: Path, maker: str) -> bool:
    marker = Path(folder) / MARKER
    return marker.is_file() and marker.read_text().strip() == maker


def mark(folder: Path, maker: str) -> None:
    (Path(folder) / MARKER).write_text(maker + "\n")


def check_replaceable(out: str | Path, maker: str, made: Callable[[Path], bool] | None = None) -> None:
    """Refuse unless `out` is absent, an empty folder, or a folder `maker` made (MARKER, or `made(out)`)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise FolderRefused(f"{out}: exists and is not a folder {maker} made; it would be replaced: "
                            "choose another output folder, or move it away")
    if next(out.iterdir(), None) is None or made_by(out, maker) or (made is not None and made(out)):
        return
    raise FolderRefused(f"{out}: a folder {maker} did not make" + (f" (no {MARKER} naming it)" if made is None else "")
                        + "; replacing it would delete what it holds: choose another output folder, or remove it yourself")


def check_apart(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder that is, holds or lies inside one of `inputs` ({what: path}): writing it
    would overwrite or delete the input."""
    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise FolderRefused(f"{out}: overlaps {what} {path}; writing it would overwrite or delete it: "
                                "choose an output folder outside it")


@contextlib.contextmanager
def replacing(out: str | Path, maker: str, made: Callable[[Path], bool] | None = None, marker: bool = True) -> Iterator[Path]:
    """Yield a new, empty staging folder beside `out`; when the block ends without an error, mark it (unless
    `marker` is False: the caller's `made` recognises it) and put it in `out`'s place. `out` is checked
    (check_replaceable) before and again just before the swap; on an error the staging folder is removed."""
    out = Path(out)
    check_replaceable(out, maker, made)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # the permissions a plain mkdir gives (mkdtemp's are 0700)
    try:
        yield staging
        if marker:
            mark(staging, maker)
        check_replaceable(out, maker, made)
        old = None
        if out.exists():  # rename it aside first: os.replace cannot replace a non-empty folder
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class DiskFull(OSError):
    """The disk filled up while an output was written; the message names the file (or folder) and says so."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    # torch.save ("inline_container.cc ... unexpected pos", "file write failed") and safetensors
    # ("No space left on device", "StorageFull") report a full disk in their own words
    text = str(err)
    return any(sign in text for sign in ("unexpected pos", "file write failed", "No space left on device", "StorageFull"))


@contextlib.contextmanager
def naming_full_disk(target: str | Path, what: str) -> Iterator[None]:
    """Turn a full-disk error raised in the block (OSError ENOSPC, or torch's and safetensors' own errors)
    into DiskFull naming the file (the error's own, else `target`) and `what` was being written."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        if not _disk_full(err):
            raise
        where = getattr(err, "filename", None) or target
        raise DiskFull(f"{where}: the disk is full (no space left on device) while writing {what}; "
                       "free space, then rerun") from err
