"""The buffer's file steps: the pending batch, quarantine, listing, expiry.

All functions here block; callers run them in a thread. OSError becomes
PersistError/BufferFullError through ``agent.base.durable.translate``. A rename
into pending/ or rejected/ never replaces a file there (``rename_noreplace``);
only ``replace_durably`` replaces, and only the claimed file itself.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Container
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
from agent.base.fsync_pool import FsyncPool
from agent.base.syscalls import rename_noreplace
from agent.errors import PersistError
from agent.spool.record import REASON_SUFFIX, BufferDirs, PendingRecord, is_order_file

# How many free names quarantine() tries when others keep taking them first.
QUARANTINE_ATTEMPTS = 100


def withdraw_pending(dirs: BufferDirs, name: str) -> None:
    """Unlink ``pending/{name}`` durably (an order refused after its file was written)."""
    try:
        os.unlink(dirs.pending / name)
        fsync_dir(dirs.pending)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise translate(exc, f"pending/{name}") from exc


def write_pending_batch(
    dirs: BufferDirs, records: list[PendingRecord], pool: FsyncPool
) -> list[BaseException | None]:
    """Make a batch of records durable in pending/ with one directory fsync.

    File fsyncs run in parallel on ``pool``; the directory is synced once after
    all renames. An entry is None only when that record is durable.
    """
    pending = str(dirs.pending)  # plain strings: a Path per file step cost ~5% of the GIL
    results: list[BaseException | None] = [None] * len(records)
    names = [r.filename for r in records]
    tmps = [f"{pending}/.{name}{TMP_SUFFIX}" for name in names]
    # Create and write every temp file here (page cache only, fast); only the fsyncs
    # go to the pool, in parallel, so the pool's threads take the GIL once per file
    # instead of once per system call (32 threads contending for it cost more system
    # time than the fsyncs themselves). Creates and renames stay on this one thread:
    # they take the directory's lock, which threads contending for it spin on in the
    # kernel (tried: slices of the batch each creating, syncing and renaming their
    # own files doubled the system time per order).
    written: list[int] = []
    fds: list[int] = []
    for i, (tmp, record) in enumerate(zip(tmps, records, strict=True)):
        try:
            fds.append(create_written(tmp, record.to_bytes()))
            written.append(i)
        except OSError as exc:
            results[i] = translate(exc, f"pending/{names[i]}")
            unlink_quietly(tmp)
    try:
        errors = pool.sync_all(fds)
    finally:
        for fd in fds:
            os.close(fd)
    renamed = False
    for i, error in zip(written, errors, strict=True):
        name = names[i]
        if error is not None:
            results[i] = (
                translate(error, f"pending/{name}")
                if isinstance(error, OSError)
                else PersistError(f"cannot write pending/{name}: {error!r}")
            )
            unlink_quietly(tmps[i])
            continue
        try:
            rename_noreplace(tmps[i], f"{pending}/{name}")
            renamed = True
        except FileExistsError:
            # The serial was issued before (the counter went backwards somehow): the
            # file there is another acknowledged order. Never touch it; refuse this one.
            record = records[i]
            results[i] = PersistError(
                f"pending/{name} already exists, so order {record.dedupe_key!r} "
                f"(written to pending/.{name}{TMP_SUFFIX}) was not accepted and "
                f"its temp file removed; serial {record.serial} was issued twice (did the "
                "serial counter in agent.state_dir go back, or does another agent write "
                "this buffer?); the existing file is untouched"
            )
            unlink_quietly(tmps[i])
        except OSError as exc:
            results[i] = translate(exc, f"pending/{name}")
            unlink_quietly(tmps[i])
    if renamed:
        try:
            fsync_dir(pending)
        except OSError as exc:
            err = translate(exc, "the pending/ directory entry")
            # The renamed files stay (never delete); they are just not acknowledged.
            results = [r if r is not None else err for r in results]
    return results


def quarantine(
    dirs: BufferDirs, src: Path, reason: dict[str, Any], content: bytes | None = None
) -> Path:
    """Move ``src`` (content untouched) to rejected/ with a reason file beside it.

    The reason is written first, so a rejected file never lacks one. ``content``:
    ``src`` is a symlink whose target was read: rejected/ gets a real file holding
    it, and only the link is removed (its target is not ours to move).
    A FIFO, device or directory is moved as it is, never opened. Nothing written or
    renamed here replaces anything: a name taken meanwhile (by edge-recover beside
    the agent) means the next free name.
    """
    reason_data = orjson.dumps({**reason, "original_path": str(src), "rejected_at": time.time()})
    for _ in range(QUARANTINE_ATTEMPTS):
        name = _free_name(dirs.rejected, src.name)
        reason_path = dirs.rejected / (name + REASON_SUFFIX)
        try:
            write_file_durably(dirs.rejected, reason_path.name, reason_data)
        except FileExistsError:
            continue  # taken since _free_name looked: the next look sees it
        target = dirs.rejected / name
        try:
            if content is not None:
                write_file_durably(dirs.rejected, name, content)
                os.unlink(src)
            else:
                rename_noreplace(src, target)
                if stat.S_ISREG(os.lstat(target).st_mode):
                    os.chmod(target, 0o600)  # an inbox file may come in with any mode
            fsync_dir(dirs.rejected)
            fsync_dir(src.parent)
        except FileExistsError:
            unlink_quietly(reason_path)  # ours, just written; try the next name
            continue
        except (OSError, PersistError) as exc:
            if not os.path.lexists(target):  # never a reason without its file
                unlink_quietly(reason_path)
            if isinstance(exc, PersistError):
                raise
            raise translate(exc, f"rejected/{name}") from exc
        return target
    raise PersistError(
        f"no free name in rejected/ for {src.name} after "
        f"{QUARANTINE_ATTEMPTS} attempts; it stays where it is"
    )


def _free_name(directory: Path, name: str) -> str:
    """``name``, else ``stem.1.ext``, ``stem.2.ext`` ...: the first one free for both the
    file and its reason file (a dangling link counts as taken)."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    n = 0
    while True:
        candidate = name if n == 0 else f"{stem}.{n}.{ext}" if ext else f"{stem}.{n}"
        if not (
            os.path.lexists(directory / candidate)
            or os.path.lexists(directory / (candidate + REASON_SUFFIX))
        ):
            return candidate
        n += 1


def list_pending(dirs: BufferDirs) -> list[tuple[str, int]]:
    """(name, size) of every pending order file, oldest serial first."""
    out = []
    with os.scandir(dirs.pending) as it:
        for entry in it:
            if is_order_file(entry.name):
                try:
                    # Not following links: a link or a FIFO in pending/ is listed too,
                    # and the drain moves it aside (agent.spool.reading).
                    out.append((entry.name, entry.stat(follow_symlinks=False).st_size))
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


def expire_merged(dirs: BufferDirs, older_than_s: float, only: Container[str] | None = None) -> int:
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
