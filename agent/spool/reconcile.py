"""Start-up reconciliation: the files are the truth, the journal is an index.

Every pending file gets a "buffered" journal row (a crash may have come
between the fsync and the journal commit); a "buffered" row whose file has
left pending/ takes the state of where the file is now. Every disagreement is
logged. Also finds the highest serial counter on disk, so a lost or reset
state database can never make the agent issue a serial twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from agent.errors import ConfigError, CorruptRecordError, OrderFileError, PersistError
from agent.orders import body_digest
from agent.spool.claims import try_claim
from agent.spool.pins import pin_file
from agent.spool.reading import read_order_file
from agent.spool.record import BufferDirs, PendingRecord, is_order_file, parse_tolerant
from agent.state.journal import BUFFERED, MERGED, REJECTED, Entry, Journal
from agent.state.serials import parse_counter

log = logging.getLogger("agent.reconcile")


class MisplacedBuffer(ConfigError):
    """Orders the journal knows as buffered are not in this buffer: refuse to start."""


@dataclass(frozen=True)
class DiskView:
    pending: dict[str, PendingRecord]  # serial -> record (parsable files only)
    merged: frozenset[str]
    rejected: frozenset[str]
    max_counter: int


def _serials_in(directory: os.PathLike[str] | str) -> set[str]:
    with os.scandir(directory) as it:
        return {e.name[: -len(".json")] for e in it if is_order_file(e.name)}


def read_disk(dirs: BufferDirs, node_prefix: str, known_buffered: set[str]) -> DiskView:
    pending: dict[str, PendingRecord] = {}
    pending_names = _serials_in(dirs.pending)
    for serial in pending_names - known_buffered:
        path = dirs.pending / f"{serial}.json"
        try:
            record = parse_tolerant(read_order_file(path, follow_symlinks=False), str(path))
        except FileNotFoundError:
            continue
        except (OSError, OrderFileError) as exc:
            log.warning("pending file not indexed: %s", exc)  # the drain quarantines it
            continue
        pending[record.serial] = record
    merged = _serials_in(dirs.merged)
    rejected = _serials_in(dirs.rejected)
    counters = (parse_counter(s, node_prefix) for s in pending_names | merged | rejected)
    return DiskView(
        pending,
        frozenset(merged),
        frozenset(rejected),
        max((c for c in counters if c is not None), default=0),
    )


async def reconcile(journal: Journal, dirs: BufferDirs, node_prefix: str) -> DiskView:
    buffered = await journal.buffered_serials()
    view = await asyncio.to_thread(read_disk, dirs, node_prefix, buffered)
    for serial, record in view.pending.items():
        log.warning("pending file %s had no journal row; indexed from the file", serial)
        await journal.record(
            Entry(
                record.dedupe_key,
                serial,
                BUFFERED,
                record.pinned_to,
                None,
                body_digest(record.raw_body),
                record.received_at,
            )
        )
    pending_now = await asyncio.to_thread(_serials_in, dirs.pending)
    missing = sorted(buffered - pending_now - view.merged - view.rejected)
    here = str(dirs.root.resolve())
    before = await journal.setting("buffer_path")
    if missing and before is not None and before != here:
        raise MisplacedBuffer(
            f"{len(missing)} orders the journal holds as buffered (e.g. {missing[0]}) are "
            f"not in {here}/pending: they were buffered under {before}. Move "
            f"{before}/pending/*.json into {here}/pending/ (or set buffer.path back to "
            f"{before}), then start again"
        )
    await journal.set_setting("buffer_path", here)
    for serial in buffered - pending_now:
        if serial in view.rejected:
            state = REJECTED
        else:
            state = MERGED
            if serial not in view.merged:
                log.warning(
                    "journal row %s is buffered but its file is gone from pending/, "
                    "merged/ and rejected/; assuming another tool (edge-recover) "
                    "delivered it",
                    serial,
                )
        await journal.mark(serial, state)
    await _apply_intents(journal, dirs)
    return view


async def _apply_intents(journal: Journal, dirs: BufferDirs) -> None:
    """A crash mid-send leaves the journal's note of the cluster, not the file's pin:
    pin the file now, before the drain could send the order anywhere else."""
    for serial, cluster in (await journal.buffered_pins()).items():
        if cluster is None:
            continue
        path = dirs.pending / f"{serial}.json"
        try:
            claim = await asyncio.to_thread(try_claim, path, False, False)
        except OrderFileError:
            continue  # the drain quarantines it, or reports it unreadable
        if claim is None:
            continue
        try:
            record = parse_tolerant(claim.data, f"pending/{path.name}")
            await asyncio.to_thread(pin_file, claim, record, cluster, "a send there was cut short")
        except CorruptRecordError:
            pass  # the drain quarantines it
        except PersistError as exc:
            log.error(
                "could not pin %s to %s in its file (%s); the journal still says so",
                serial,
                cluster,
                exc,
            )
        finally:
            claim.release()
