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
    fsync_dir,
    translate,
    unlink_quietly,
    write_file_durably,
)
from agent.base.syscalls import rename_noreplace
from agent.errors import PersistError
from agent.spool.record import REASON_SUFFIX, BufferDirs, is_order_file

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
