"""Durable file steps: temp file, fsync, rename, fsync dir; OSError -> PersistError.

All functions here block; callers run them in a thread. This is the one place
where OSError from writing a durable file becomes PersistError/BufferFullError
(the buffer, the serial floor, the inbox and edge-recover all write through it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from agent.base.syscalls import rename_noreplace
from agent.errors import BufferFullError, PersistError

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def translate(exc: OSError, what: str) -> PersistError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BufferFullError(f"disk full while writing {what}: free space or raise the quota")
    return PersistError(f"cannot write {what}: {exc.strerror or exc}")


def write_file_durably(directory: Path, name: str, data: bytes) -> Path:
    """temp file, fsync, rename (never over an existing file), fsync dir.

    Raises PersistError/BufferFullError; FileExistsError if ``name`` is taken.
    """
    target = directory / name
    tmp = directory / f".{name}{TMP_SUFFIX}"
    try:
        write_tmp(tmp, data)
        rename_noreplace(tmp, target)
        fsync_dir(directory)
    except FileExistsError:
        unlink_quietly(tmp)
        raise
    except OSError as exc:
        unlink_quietly(tmp)
        raise translate(exc, str(target)) from exc
    return target


def replace_durably(path: Path, data: bytes) -> int:
    """Atomically replace ``path`` (temp, fsync, rename, fsync dir): the one rename that
    replaces, and only the caller's claimed file by its own new version.

    The new inode is flocked before the rename and its fd returned, so the
    caller's claim on the file is never open to another process in between.
    """
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    fd = -1
    try:
        write_tmp(tmp, data)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        unlink_quietly(tmp)
        raise translate(exc, str(path)) from exc
    return fd


def write_tmp(tmp: Path, data: bytes, sync: bool = True) -> None:
    fd = create_written(tmp, data)
    try:
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def create_written(tmp: str | Path, data: bytes) -> int:
    """Create ``tmp`` (0600) holding ``data``, not yet synced; return its open fd."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
