"""What is in a buffer directory: a streaming scan, and turning one file into a record.

Two kinds of input, both ``*.json``:

- ``DIR/pending/*`` and loose ``DIR/*`` files in the buffer's record format
  (``agent.buffer.PendingRecord``);
- loose raw order objects, as another machine or an older tool left them.
  They are validated by the agent's own intake rules and get a serial from a
  recovery-only range, ``RCV-{NODE}-{hash}``, which an agent serial
  (``{NODE}-{YYYYMMDD}-{counter}``) can never equal. The hash covers the file
  name and content, so a rerun gives the same file the same serial.

Nothing here holds more than one file at a time: a directory of a million
files streams through.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from agent.delivery.targets import may_send
from agent.errors import CorruptRecordError, InvalidOrderError, UnreadableFile
from agent.orders import body_digest as raw_body_digest
from agent.orders import parse_order
from agent.spool.reading import load_order_file
from agent.spool.record import ADDED_KEYS_MARK, PendingRecord, is_order_file, parse_tolerant

RECOVERY_PREFIX = "RCV"


@dataclass(frozen=True)
class Found:
    """One order file as the scan saw it (no lock held; the claim re-reads it)."""

    file: str  # path relative to DIR: "pending/S.json" or "x.json"
    loose: bool
    serial: str | None
    key: str | None
    digest: bytes | None
    error: str | None  # set when the file is not a usable order
    pinned_to: str | None = None  # the one cluster that may hold it (CONTRACT 5)
    unreadable: bool = False  # the error is ours to fix (EACCES, EIO, a dangling link)
    raw: bool = False  # a loose raw order object (RCV- serial): no agent ever answered for it


def order_files(root: Path) -> Iterator[tuple[str, bool]]:
    """(relative path, loose?) of every order file: pending/ first, then DIR itself.

    Every entry with an order file's name, whatever it is: a symlink is read
    through, and a FIFO or a directory is reported, not passed over in silence.
    """
    pending = root / "pending"
    if pending.is_dir():
        with os.scandir(pending) as it:
            for entry in it:
                if is_order_file(entry.name):
                    yield f"pending/{entry.name}", False
    with os.scandir(root) as it:
        for entry in it:
            if is_order_file(entry.name):
                yield entry.name, True


def recovery_serial(node: str, name: str, data: bytes) -> str:
    digest = hashlib.blake2b(name.encode() + b"\0" + data, digest_size=8).hexdigest()
    return f"{RECOVERY_PREFIX}-{node.upper()}-{digest}"


def body_digest(record: PendingRecord) -> bytes:
    """What makes two files with one dedupe key the same order, or a conflict: the
    journal's digest of the raw body, so the agent and edge-recover judge alike."""
    return raw_body_digest(record.raw_body)


def to_record(
    file: str, loose: bool, data: bytes, node: str, mtime: float | None = None
) -> PendingRecord:
    """The order held by ``data`` (read by ``agent.spool.reading``, so within its cap);
    CorruptRecordError says why it is not one."""
    return read_record(file, loose, data, node, mtime)[0]


def read_record(
    file: str, loose: bool, data: bytes, node: str, mtime: float | None = None
) -> tuple[PendingRecord, bool]:
    """``to_record``, and whether the merge may add its keys to ``data`` in place: a JSON
    object that parsed as it is (no torn tail) and has none of them. Decided from the one
    parse the file gets, not by scanning its bytes again when the center has answered."""
    if not loose:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            try:
                return PendingRecord.from_dict(obj, origin=file), keys_addable(obj, data)
            except CorruptRecordError:
                pass  # parse_tolerant says why, or undoes a torn tail
        return parse_tolerant(data, file), False
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecordError(f"{file}: not JSON ({exc})") from exc
    if isinstance(obj, dict) and "v" in obj:
        return PendingRecord.from_dict(obj, origin=file), keys_addable(obj, data)
    try:
        order = parse_order(data, None)
    except InvalidOrderError as exc:
        raise CorruptRecordError(f"{file}: not an order: {exc}") from exc
    when = datetime.fromtimestamp(mtime or 0).astimezone()
    raw = PendingRecord(
        serial=recovery_serial(node, file, data),
        node_id=node,
        received_at=when.isoformat(timespec="milliseconds"),
        channel_id=order.channel_id,
        dedupe_key=order.dedupe_key,
        customer_phone=order.customer_phone,
        body=data.decode("utf-8"),
    )
    return raw, False  # a raw object gets a new merged/ copy, never keys added


# The keys the merge adds to a merged/ copy, and the ones a record file holds.
ADDED_KEYS = frozenset(("order_id", "cluster", "merged_at", "target", "duplicate_of"))
RECORD_KEYS = frozenset(PendingRecord.__dataclass_fields__) | {"v"}


def keys_addable(obj: dict[str, Any], data: bytes) -> bool:
    """May the merge append its keys to ``data`` (the object ``obj``) in place? None of
    them may be there already (a key twice is not JSON anyone reads alike), and
    ``agent.spool.moves`` takes a ``,"order_id":`` in the bytes for an earlier attempt's
    tail: only a record's own keys (strings, no nested objects, where a quote is
    escaped) guarantee there is none, else the bytes are searched."""
    return ADDED_KEYS.isdisjoint(obj) and (obj.keys() <= RECORD_KEYS or ADDED_KEYS_MARK not in data)


def read_found(root: Path, file: str, loose: bool, node: str) -> Found | None:
    """Read and classify one file; None if it vanished meanwhile (someone moved it)."""
    try:
        data, st = load_order_file(f"{root}/{file}")
        record = to_record(file, loose, data, node, st.st_mtime)
    except FileNotFoundError:
        return None
    except UnreadableFile as exc:
        return Found(file, loose, None, None, None, str(exc), unreadable=True)
    except CorruptRecordError as exc:
        return Found(file, loose, None, None, None, str(exc))
    return Found(
        file,
        loose,
        record.serial,
        record.dedupe_key,
        body_digest(record),
        None,
        record.pinned_to,
        raw=is_raw(file, loose, data, node, record),
    )


def is_raw(file: str, loose: bool, data: bytes, node: str, record: PendingRecord) -> bool:
    """A loose raw order object: its serial is the one ``to_record`` made up for it.

    Ranking puts these after every record file of their key (``rank_key``): a
    record is an order some agent answered 2xx for; a raw object is of unknown
    origin, and its made-up serial must not outrank an acknowledged order.
    """
    return loose and record.serial == recovery_serial(node, file, data)


def rank_key(raw: bool, serial: str, file: str) -> tuple[bool, str, str]:
    """Which file of a dedupe key wins: record files before raw objects, then the
    lowest serial, then the file name. The merge and the dry-run's plan both rank by it."""
    return (raw, serial, file)


def admitted(
    found: Iterable[Found], cluster: str | None, target: str, held: list[Found]
) -> Iterator[Found]:
    """The files this target may be sent: unpinned, or pinned to it (its cluster or URL).

    An order pinned elsewhere may already exist there; sending it here could create it
    twice, so it is left in pending/ and listed in ``held``.
    """
    for f in found:
        if may_send(f.pinned_to, cluster, target):
            yield f
        else:
            held.append(f)


def scan(root: Path, node: str, threads: int = 2) -> Iterator[Found]:
    """Every order file, read by ``threads`` threads (reads overlap), in listing order."""

    def read_chunk(chunk: list[tuple[str, bool]]) -> list[Found | None]:
        return [read_found(root, file, loose, node) for file, loose in chunk]

    files = order_files(root)
    with ThreadPoolExecutor(threads, thread_name_prefix="scan") as pool:
        window: deque[Future[list[Found | None]]] = deque()
        while True:
            while len(window) < threads * 2 and (chunk := list(islice(files, 256))):
                window.append(pool.submit(read_chunk, chunk))
            if not window:
                return
            for found in window.popleft().result():
                if found is not None:
                    yield found
