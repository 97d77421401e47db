"""The offline buffer on disk: record format, durable writes, claims and moves.

Shared by the agent (intake, drain, inbox) and ``edge-recover``; neither has
its own copy. Layout under ``buffer.path``::

    pending/{serial}.json   undelivered orders: the only durable copy
    inbox/*.json            drop zone for raw order objects from local processes
    merged/{serial}.json    delivered, with the center's order_id, kept retention_days
    rejected/{name}         refused or corrupt, with {name}.reason.json beside it

A file leaves pending/ only after the center confirmed (to merged/) or refused
it for good (to rejected/). Every step is temp file, fsync, rename, fsync dir.
All functions here block; callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import BufferFullError, CorruptRecordError, PersistError

RECORD_VERSION = 1
TMP_SUFFIX = ".tmp"
REASON_SUFFIX = ".reason.json"


@dataclass(frozen=True)
class PendingRecord:
    """One buffered order, as stored in ``pending/{serial}.json``."""

    serial: str
    node_id: str
    received_at: str
    channel_id: str
    dedupe_key: str
    customer_phone: str | None
    body: str  # the raw order text, verbatim

    @property
    def filename(self) -> str:
        return f"{self.serial}.json"

    @property
    def raw_body(self) -> bytes:
        return self.body.encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "serial": self.serial,
            "node_id": self.node_id,
            "received_at": self.received_at,
            "channel_id": self.channel_id,
            "dedupe_key": self.dedupe_key,
            "customer_phone": self.customer_phone,
            "body": self.body,
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "") -> PendingRecord:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise CorruptRecordError(f"{origin}: not JSON ({exc})") from exc
        return cls.from_dict(obj, origin)

    @classmethod
    def from_dict(cls, obj: Any, origin: str = "") -> PendingRecord:
        if not isinstance(obj, dict):
            raise CorruptRecordError(f"{origin}: not a JSON object")
        if obj.get("v") != RECORD_VERSION:
            raise CorruptRecordError(f"{origin}: unsupported record version v={obj.get('v')!r}")
        for key in ("serial", "node_id", "received_at", "channel_id", "dedupe_key", "body"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise CorruptRecordError(f"{origin}: field {key!r} missing or not a string")
        phone = obj.get("customer_phone")
        if phone is not None and not isinstance(phone, str):
            raise CorruptRecordError(f"{origin}: field 'customer_phone' is not a string")
        return cls(
            serial=obj["serial"],
            node_id=obj["node_id"],
            received_at=obj["received_at"],
            channel_id=obj["channel_id"],
            dedupe_key=obj["dedupe_key"],
            customer_phone=phone,
            body=obj["body"],
        )


@dataclass(frozen=True)
class BufferDirs:
    root: Path

    @property
    def pending(self) -> Path:
        return self.root / "pending"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    def ensure(self) -> None:
        """Create the layout with 0700 directories; fail loudly if we cannot."""
        for d in (self.root, self.pending, self.inbox, self.merged, self.rejected):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(exc: OSError, what: str) -> PersistError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BufferFullError(f"disk full while writing {what}: free space or raise the quota")
    return PersistError(f"cannot write {what}: {exc.strerror or exc}")


def write_file_durably(directory: Path, name: str, data: bytes) -> Path:
    """temp file, fsync, rename, fsync dir. Raises PersistError/BufferFullError."""
    target = directory / name
    tmp = directory / f".{name}{TMP_SUFFIX}"
    try:
        _write_tmp(tmp, data)
        os.rename(tmp, target)
        fsync_dir(directory)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _translate(exc, str(target)) from exc
    return target


def _write_tmp(tmp: Path, data: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
    futures = [
        pool.submit(_write_tmp, tmp, r.to_bytes()) for tmp, r in zip(tmps, records, strict=True)
    ]
    for i, fut in enumerate(futures):
        try:
            fut.result()
        except OSError as exc:
            results[i] = _translate(exc, f"pending/{records[i].filename}")
            _unlink_quietly(tmps[i])
    renamed = False
    for i, record in enumerate(records):
        if results[i] is not None:
            continue
        try:
            os.rename(tmps[i], pending / record.filename)
            renamed = True
        except OSError as exc:
            results[i] = _translate(exc, f"pending/{record.filename}")
            _unlink_quietly(tmps[i])
    if renamed:
        try:
            fsync_dir(pending)
        except OSError as exc:
            err = _translate(exc, "the pending/ directory entry")
            # The renamed files stay (never delete); they are just not acknowledged.
            results = [r if r is not None else err for r in results]
    return results


class Claim:
    """An exclusive flock on one pending file: one deliverer per file.

    The kernel drops the lock when its holder dies, so a claim left by a
    killed process is recovered by simply trying again.
    """

    def __init__(self, path: Path, fd: int, data: bytes) -> None:
        self.path = path
        self.data = data
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def try_claim(path: Path) -> Claim | None:
    """Lock and read ``path``; None if it is gone or another process holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder before us may have moved the file away while we waited.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return Claim(path, fd, b"".join(chunks))
    except BaseException:
        os.close(fd)
        raise


def finish_merged(dirs: BufferDirs, claim: Claim, record: PendingRecord,
                  order_id: Any, cluster: str) -> None:
    """The center confirmed: keep an audit copy in merged/, then drop the pending file."""
    doc = record.to_dict()
    doc["order_id"] = order_id
    doc["cluster"] = cluster
    doc["merged_at"] = time.time()
    write_file_durably(dirs.merged, claim.path.name, orjson.dumps(doc))
    os.unlink(claim.path)
    fsync_dir(claim.path.parent)
    claim.release()


def already_merged(dirs: BufferDirs, name: str) -> dict[str, Any] | None:
    """The merged/ copy of ``name`` if one exists (a crash between the merged/ write
    and the pending unlink leaves both); None otherwise."""
    try:
        doc = orjson.loads((dirs.merged / name).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def drop_pending_copy(claim: Claim) -> None:
    """Finish a move whose merged/ copy is already durable."""
    os.unlink(claim.path)
    fsync_dir(claim.path.parent)
    claim.release()


def quarantine(dirs: BufferDirs, src: Path, reason: dict[str, Any]) -> Path:
    """Move ``src`` (content untouched) to rejected/ with a reason file beside it.

    The reason is written first, so a rejected file never lacks one.
    """
    name = _free_name(dirs.rejected, src.name)
    reason = {**reason, "original_path": str(src), "rejected_at": time.time()}
    write_file_durably(dirs.rejected, name + REASON_SUFFIX, orjson.dumps(reason))
    try:
        os.rename(src, dirs.rejected / name)
        fsync_dir(dirs.rejected)
        fsync_dir(src.parent)
    except OSError as exc:
        raise _translate(exc, f"rejected/{name}") from exc
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


def is_order_file(name: str) -> bool:
    """Visible *.json files only: temp files and reason files are not orders."""
    return (
        name.endswith(".json")
        and not name.startswith(".")
        and not name.endswith(REASON_SUFFIX)
    )


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
                _unlink_quietly(Path(entry.path))
                removed += 1
    return removed


def expire_merged(dirs: BufferDirs, older_than_s: float) -> int:
    """Delete merged/ audit copies past retention: those orders are confirmed delivered."""
    cutoff = time.time() - older_than_s
    removed = 0
    with os.scandir(dirs.merged) as it:
        for entry in it:
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
