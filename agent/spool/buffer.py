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
import ctypes
import errno
import fcntl
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.errors import BufferFullError, CorruptRecordError, PersistError

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


def _write_tmp(tmp: Path, data: bytes, sync: bool = True) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
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

    def __init__(self, path: Path, fd: int, data: bytes, writable: bool = False) -> None:
        self.path = path
        self.data = data
        self.writable = writable
        self._fd: int | None = fd

    @property
    def fd(self) -> int | None:
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def try_claim(path: Path, writable: bool = False) -> Claim | None:
    """Lock and read ``path``; None if it is gone or another process holds it.

    ``writable``: open it read-write where permitted, so the holder can add
    keys in place after moving it (edge-recover); read-only otherwise.
    """
    try:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except PermissionError:
            if not writable:
                raise
            fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder before us may have moved the file away while we waited.
        st = os.fstat(fd)
        try:
            same = os.stat(path).st_ino == st.st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        want = st.st_size + 1  # one read(2) for a file that does not grow meanwhile
        chunks = []
        while chunk := os.read(fd, want):
            chunks.append(chunk)
            if len(chunk) < want:
                break
            want = 1 << 20
        return Claim(path, fd, b"".join(chunks), writable)
    except BaseException:
        os.close(fd)
        raise


def merged_document(record: PendingRecord, order_id: Any, cluster: str,
                    **extra: Any) -> bytes:
    """The audit copy kept in merged/: the record plus what the center said."""
    doc = record.to_dict()
    doc["order_id"] = order_id
    doc["cluster"] = cluster
    doc["merged_at"] = time.time()
    doc.update(extra)
    return orjson.dumps(doc)


def finish_merged(dirs: BufferDirs, claim: Claim, record: PendingRecord,
                  order_id: Any, cluster: str) -> None:
    """The center confirmed: keep an audit copy in merged/, then drop the pending file."""
    write_file_durably(dirs.merged, claim.path.name, merged_document(record, order_id, cluster))
    os.unlink(claim.path)
    fsync_dir(claim.path.parent)
    claim.release()


def already_merged(dirs: BufferDirs, name: str,
                   record: PendingRecord | None = None) -> dict[str, Any] | None:
    """The merged/ copy of ``name`` if there is one, else None.

    A crash between the merged/ write and the pending unlink leaves both. With
    ``record``, the copy must also be that order (same serial and dedupe key),
    not an unrelated file that happens to share the name. A copy that cannot be
    read counts only without ``record`` (its name says it was delivered).
    """
    path = dirs.merged / name
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError):
        return None if record is not None else {"unreadable": True}
    if not isinstance(doc, dict):
        return None if record is not None else {"unreadable": True}
    if record is not None and (doc.get("serial"), doc.get("dedupe_key")) != (
            record.serial, record.dedupe_key):
        return None
    return doc


@dataclass
class MergedMove:
    """One confirmed order on its way from its source file to ``merged/{name}``.

    Exactly one way of moving applies:

    - ``added``: the source file itself is renamed into merged/ and these keys
      are added to its JSON object in place (no new inode: fast);
    - ``document``: a new merged/ copy is written and the source unlinked
      (for sources not in the record format);
    - neither: merged/{name} already holds this order; the source is unlinked.
    """

    claim: Claim
    name: str
    document: bytes | None = None
    added: dict[str, Any] | None = None


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


def finish_merged_batch(merged_dir: Path, moves: list[MergedMove]) -> list[BaseException | None]:
    """finish_merged for many orders, with one filesystem sync instead of 3 fsyncs each.

    The order of steps is what keeps the promise that a source file never goes
    before its merged/ copy is durable:

    1. renamed sources (``added``): the keys are added by rewriting the file
       from its closing brace on (the order's bytes before it are never
       touched; ``strip_added_keys`` undoes a torn tail), then rename(2) into
       merged/ -- atomic, so the order is in exactly one of the two
       directories at every instant, even after a crash;
    2. new copies (``document``): temp file, rename into merged/;
    3. one sync of the filesystem (data and directory entries);
    4. only now unlink the sources of 2 and of already merged ones, fsync their dirs.

    Claims are released at the end. An entry is None once that order is in merged/.
    """
    try:
        return complete_merged(merged_dir, moves, place_in_merged(merged_dir, moves))
    finally:
        for move in moves:
            move.claim.release()


def place_in_merged(merged_dir: Path, moves: list[MergedMove]) -> list[BaseException | None]:
    """Steps 1 and 2 of finish_merged_batch: nothing is synced or unlinked yet."""
    results: list[BaseException | None] = [None] * len(moves)
    for i, move in enumerate(moves):
        target = merged_dir / move.name
        try:
            if move.added is not None:
                _add_keys(move.claim.path, move.claim, move.added)
                os.rename(move.claim.path, target)
            elif move.document is not None:
                tmp = merged_dir / f".{move.name}{TMP_SUFFIX}"
                try:
                    _write_tmp(tmp, move.document, sync=False)
                    os.rename(tmp, target)
                except OSError:
                    _unlink_quietly(tmp)
                    raise
        except OSError as exc:
            results[i] = _translate(exc, f"merged/{move.name}")
    return results


def complete_merged(merged_dir: Path, moves: list[MergedMove],
                    results: list[BaseException | None]) -> list[BaseException | None]:
    """Steps 3 and 4 of finish_merged_batch, after place_in_merged; releases the claims."""
    try:
        unlink = [i for i, m in enumerate(moves) if m.added is None and results[i] is None]
        try:
            sync_filesystem(merged_dir)
        except OSError as exc:
            err = _translate(exc, "the merged/ copies")
            for i in unlink:
                results[i] = err  # sources stay: nothing is unlinked unsynced
            return results
        parents = set()
        for i in unlink:
            path = moves[i].claim.path
            try:
                os.unlink(path)
                parents.add(path.parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                results[i] = _translate(exc, str(path))
        for parent in parents:
            # A lost unlink only leaves a source that already_merged() recognises.
            with contextlib.suppress(OSError):
                fsync_dir(parent)
        return results
    finally:
        for move in moves:
            move.claim.release()


def _add_keys(path: Path, claim: Claim, added: dict[str, Any]) -> None:
    """Turn ``{...}`` into ``{...,"k":v}`` by rewriting from the closing brace on.

    ``claim.data`` is the file's content, a JSON object none of whose keys are
    in ``added``. The bytes before the closing brace are never touched.
    """
    data = claim.data
    end = data.rstrip().rfind(b"}")
    if end < 0 or not added:
        return
    tail = b"," + orjson.dumps(added)[1:]
    own = claim.fd is None or not claim.writable
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC) if own else claim.fd
    assert fd is not None
    try:
        os.pwrite(fd, tail, end)
        if end + len(tail) < len(data):
            os.ftruncate(fd, end + len(tail))
    finally:
        if own:
            os.close(fd)


ADDED_KEYS_MARK = b',"order_id":'


def strip_added_keys(data: bytes) -> bytes | None:
    """The record as it was before finish_merged_batch added keys to it, else None.

    A crash can leave a file whose added tail is torn; everything before the
    mark is the original record, so it is never lost.
    """
    at = data.rfind(ADDED_KEYS_MARK)
    return None if at < 0 else data[:at] + b"}"


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
        os.chmod(dirs.rejected / name, 0o600)  # an inbox file may come in with any mode
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
