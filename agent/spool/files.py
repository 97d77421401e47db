"""The buffer's file steps: the pending batch, quarantine, listing, expiry.

All functions here block; callers run them in a thread. OSError becomes
PersistError/BufferFullError through ``agent.base.durable.translate``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from agent.base.durable import (
    TMP_SUFFIX,
    create_written,
    fsync_dir,
    translate,
    unlink_quietly,
    write_file_durably,
)
from agent.spool.record import REASON_SUFFIX, BufferDirs, PendingRecord, is_order_file


def write_pending_batch(
    dirs: BufferDirs, records: list[PendingRecord], pool: ThreadPoolExecutor
) -> list[BaseException | None]:
    """Make a batch of records durable in pending/ with one directory fsync.

    File fsyncs run in parallel on ``pool``; the directory is synced once after
    all renames. An entry is None only when that record is durable.
    """
    pending = dirs.pending
    results: list[BaseException | None] = [None] * len(records)
    tmps = [pending / f".{r.filename}{TMP_SUFFIX}" for r in records]
    # Create and write every temp file here (page cache only, fast); only the fsyncs
    # go to the pool, in parallel, so the pool's threads take the GIL once per file
    # instead of once per system call (32 threads contending for it cost more system
    # time than the fsyncs themselves).
    fds: list[int] = [-1] * len(records)
    for i, (tmp, record) in enumerate(zip(tmps, records, strict=True)):
        try:
            fds[i] = create_written(tmp, record.to_bytes())
        except OSError as exc:
            results[i] = translate(exc, f"pending/{record.filename}")
            unlink_quietly(tmp)
    futures = {i: pool.submit(os.fsync, fd) for i, fd in enumerate(fds) if fd >= 0}
    for i, fut in futures.items():
        try:
            fut.result()
        except OSError as exc:
            results[i] = translate(exc, f"pending/{records[i].filename}")
            unlink_quietly(tmps[i])
        finally:
            os.close(fds[i])
    renamed = False
    for i, record in enumerate(records):
        if results[i] is not None:
            continue
        try:
            os.rename(tmps[i], pending / record.filename)
            renamed = True
        except OSError as exc:
            results[i] = translate(exc, f"pending/{record.filename}")
            unlink_quietly(tmps[i])
    if renamed:
        try:
            fsync_dir(pending)
        except OSError as exc:
            err = translate(exc, "the pending/ directory entry")
            # The renamed files stay (never delete); they are just not acknowledged.
            results = [r if r is not None else err for r in results]
    return results


def quarantine(dirs: BufferDirs, src: Path, reason: dict[str, Any]) -> Path:
    """Move ``src`` (content untouched) to rejected/ with a reason file beside it.

    The reason is written first, so a rejected file never lacks one.
    """
    name = _free_name(dirs.rejected, src.name)
    reason = {**reason, "original_path": str(src), "rejected_at": time.time()}
    write_file_durably(dirs.rejected, name + REASON_SUFFIX, orjson.dumps(reason))
    try:
        os.rename(src, dirs.rejected / name)
        os.chmod(dirs.rejected / name, 0o600)  # an inbox file may come in with any mode
        fsync_dir(dirs.rejected)
        fsync_dir(src.parent)
    except OSError as exc:
        raise translate(exc, f"rejected/{name}") from exc
    return dirs.rejected / name


def _free_name(directory: Path, name: str) -> str:
    if not (directory / name).exists():
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    n = 1
    while True:
        candidate = f"{stem}.{n}.{ext}" if ext else f"{stem}.{n}"
        if not (directory / candidate).exists():
            return candidate
        n += 1


def sync_filesystem(path: Path) -> None:
    """Make every write on ``path``'s filesystem durable (syncfs(2); sync(2) elsewhere).

    One call replaces thousands of per-file fsyncs when a batch of files was
    written; like fsync it returns only once the data and the directory entries
    are on disk.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC is not None and _LIBC.syncfs(fd) == 0:
            return
        if _LIBC is not None and ctypes.get_errno() not in (errno.ENOSYS, 0):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        os.sync()
    finally:
        os.close(fd)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def list_pending(dirs: BufferDirs) -> list[tuple[str, int]]:
    """(name, size) of every pending order file, oldest serial first."""
    out = []
    with os.scandir(dirs.pending) as it:
        for entry in it:
            if is_order_file(entry.name):
                try:
                    out.append((entry.name, entry.stat().st_size))
                except FileNotFoundError:
                    continue
    out.sort()
    return out


def remove_stale_temps(directory: Path) -> int:
    """Temp files left by a crash were never acknowledged; clear them at start-up."""
    removed = 0
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX):
                unlink_quietly(Path(entry.path))
                removed += 1
    return removed


def expire_merged(dirs: BufferDirs, older_than_s: float,
                  only: Container[str] | None = None) -> int:
    """Delete merged/ audit copies past retention: those orders are confirmed delivered.

    ``only``: the names that may go (chain verification keeps the others: an order whose
    chain is unfinished, or that the ledger has not enrolled yet)."""
    cutoff = time.time() - older_than_s
    removed = 0
    with os.scandir(dirs.merged) as it:
        for entry in it:
            if only is not None and entry.name not in only:
                continue
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
