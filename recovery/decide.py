"""What to do with one order file, decided under its claim.

Runs in the merge's claim thread: claims the file (the same flock the
agent's drain takes, so the two never deliver one file at once), reads it
once, and settles everything that needs no request: corrupt files, orders
the checkpoint already saw confirmed, losers of a dedupe group whose winner
is confirmed. What is left must be sent, or (a loser whose winner is still
on its way) waits for the losers' pass.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.delivery.decide import Attempts
from agent.errors import CorruptRecordError, NotARegularFile, UnreadableFile
from agent.orders import body_digest as raw_body_digest
from agent.spool.claims import Claim, try_claim
from agent.spool.moves import already_merged, merged_document
from agent.spool.record import BufferDirs, PendingRecord
from agent.upstream.answers import BatchItem
from recovery.checkpoint import DELIVERED, UNREADABLE, ResultRow
from recovery.finisher import LEAVE, MERGE, NOTE, QUARANTINE, Settled
from recovery.item import Item
from recovery.ranking import Facts
from recovery.source import body_digest, is_raw, read_found, read_record

CLUSTER = "recover"
NO_ATTEMPTS = Attempts()  # frozen: one for every order not sent yet


@dataclass
class Work:
    """A claimed order that must go to the center."""

    row: Item
    claim: Claim
    record: PendingRecord
    merged_name: str
    raw: bool = False  # a raw order object, not a record: gets a new merged/ copy
    attempts: Attempts = NO_ATTEMPTS
    in_place: bool = False  # the claim's bytes may take our keys (``source.keys_addable``)

    @property
    def item(self) -> BatchItem:
        r = self.record
        return BatchItem(r.dedupe_key, r.serial, r.node_id, r.body)

    def result(
        self,
        outcome: str,
        order_id: Any = None,
        error: str | None = None,
        duplicate_of: str | None = None,
    ) -> ResultRow:
        r = self.record
        digest = body_digest(r) if outcome in DELIVERED and duplicate_of is None else None
        return ResultRow(
            r.serial, r.dedupe_key, self.row.file, outcome, order_id, error, duplicate_of, digest
        )

    def merged(
        self, outcome: str, order_id: Any, target: str, duplicate_of: str | None = None
    ) -> Settled:
        added: dict[str, Any] = {
            "order_id": order_id,
            "cluster": CLUSTER,
            "merged_at": time.time(),
            "target": target,
        }
        if duplicate_of is not None:
            added["duplicate_of"] = duplicate_of
        row = self.result(outcome, order_id, duplicate_of=duplicate_of)
        if self.claim.fd is None:  # no file behind it (the replica): the outcome is all
            return Settled(row, MERGE, self.claim, self.merged_name)
        if self.renamable:
            return Settled(row, MERGE, self.claim, self.merged_name, added=added)
        extra = {k: v for k, v in added.items() if k not in ("order_id", "cluster", "merged_at")}
        doc = merged_document(self.record, order_id, CLUSTER, **extra)
        return Settled(row, MERGE, self.claim, self.merged_name, document=doc)

    @property
    def renamable(self) -> bool:
        """A record-format file without our keys is moved as is, keys added in place.

        Never a symlink: merged/ gets a real file holding the order, only the link
        goes, and its target (maybe another buffer's only copy) is never changed.
        Whether the bytes hold none of our keys was decided when the file was parsed
        (``in_place``); a pin since then rewrote them as a record, which holds none."""
        return self.in_place and not self.raw and not self.claim.linked

    def quarantined(self, outcome: str, error: str, details: dict[str, Any]) -> Settled:
        reason = {
            "reason": outcome,
            "error": error,
            "serial": self.record.serial,
            "dedupe_key": self.record.dedupe_key,
            **details,
        }
        return Settled(self.result(outcome, error=error), QUARANTINE, self.claim, reason=reason)

    def left(self, error: str) -> Settled:
        return Settled(self.result("pending", error=error), LEAVE, self.claim)


@dataclass(frozen=True)
class Held:
    """Another process (the agent's drain) holds this file's claim: come back later."""

    row: Item


@dataclass(frozen=True)
class Opened:
    """A claimed file and the order it holds."""

    row: Item
    claim: Claim
    record: PendingRecord
    in_place: bool = False  # see ``Work.in_place``


Decision = Work | Settled | Held


def open_file(root: Path, dirs: BufferDirs, node: str, row: Item) -> Opened | Settled | Held:
    """Claim and read ``row.file``. A file the agent holds is read without the claim, so
    its dedupe key is ranked where it was met; corrupt files are settled here."""
    path = f"{root}/{row.file}"  # a str: a Path (or os.path.join) per file costs more than
    # the claim's system calls
    try:
        claim = try_claim(path, writable=True)
    except UnreadableFile as exc:  # EACCES, EIO, a dangling link: left where it is
        return Settled(ResultRow(row.ref, None, row.file, UNREADABLE, error=str(exc)), NOTE)
    except CorruptRecordError as exc:  # a FIFO, a directory, over the cap: moved aside unread
        reason = "not_a_regular_file" if isinstance(exc, NotARegularFile) else "too_large"
        return Settled(
            ResultRow(row.ref, None, row.file, "rejected", error=f"corrupt: {exc}"),
            QUARANTINE,
            reason={"reason": reason, "error": str(exc)},
            unclaimed=path,
        )
    if claim is None:
        if not os.path.exists(path):
            return _vanished(dirs, row, Path(path))
        if row.serial is None:
            peek = read_found(root, row.file, row.loose, node)
            if peek is not None and peek.error is None:
                row.serial, row.key, row.pinned_to = peek.serial, peek.key, peek.pinned_to
                row.digest = peek.digest
        return Held(row)
    try:
        record, in_place = read_record(
            row.file, row.loose, claim.data, node, _mtime(claim) if row.loose else None
        )
    except CorruptRecordError as exc:
        return Settled(
            ResultRow(row.ref, None, row.file, "rejected", error=f"corrupt: {exc}"),
            QUARANTINE,
            claim,
            reason={"reason": "corrupt", "error": str(exc)},
        )
    if row.serial is not None and (record.dedupe_key != row.key or record.serial != row.serial):
        return Work(row, claim, record, "").left("the file changed during the merge; run again")
    row.serial, row.key, row.pinned_to = record.serial, record.dedupe_key, record.pinned_to
    return Opened(row, claim, record, in_place)


def decide(
    dirs: BufferDirs,
    node: str,
    target: str,
    opened: Opened,
    own: Facts,
    key: Facts,
    winner_outcome: str | None,
) -> Work | Settled | None:
    """Work to send, settled, or None: a loser whose winner is not confirmed yet."""
    row, claim, record = opened.row, opened.claim, opened.record
    wanted = (
        row.file.rpartition("/")[2]  # its base name (os.path.basename costs 3x)
        if not row.loose or row.file.endswith(record.filename)
        else record.filename
    )
    # pending/{serial}.json can only meet its own order in merged/ (left there by a
    # crash of the agent between copy and unlink): replacing it is harmless, so only
    # loose files, whose names are anyone's, pay for a lookup in merged/.
    taken = row.loose and _exists(dirs, wanted)
    merged_before = already_merged(dirs, wanted, record) if taken else None
    name = merged_name(dirs, wanted) if taken and not merged_before else wanted
    raw = row.loose and is_raw(row.file, True, claim.data, node, record)
    work = Work(row, claim, record, name, raw, NO_ATTEMPTS, opened.in_place)
    if key.confirmed_serial == record.serial or merged_before:
        # Confirmed in an earlier run (or by the agent): finish the move, no request.
        order_id = (
            own.own_order_id
            if own.own_order_id is not None
            else (
                key.confirmed_order_id
                if key.confirmed_serial == record.serial
                else merged_before.get("order_id")
                if merged_before
                else None
            )
        )
        outcome = own.own_outcome if own.own_outcome in DELIVERED else "duplicate"
        if merged_before:
            return Settled(work.result(outcome or "duplicate", order_id), MERGE, claim, name)
        return work.merged(outcome or "duplicate", order_id, target)
    if key.confirmed_serial is not None:
        return _loser(
            work, key.confirmed_serial, key.confirmed_order_id, key.confirmed_digest, target
        )
    if not row.wins and winner_outcome not in ("rejected", "conflict"):
        return None
    return work


def _loser(work: Work, winner: str, order_id: Any, digest: bytes | None, target: str) -> Settled:
    """Same key as a confirmed order: a duplicate if the body is the same, else a conflict."""
    if digest is None or digest == body_digest(work.record):
        return work.merged("duplicate", order_id, target, duplicate_of=winner)
    return work.quarantined(
        "conflict",
        f"dedupe key {work.record.dedupe_key!r} was merged with serial {winner} "
        "and a different body; the first order stands",
        {"duplicate_of": winner},
    )


def _vanished(dirs: BufferDirs, row: Item, path: Path) -> Settled:
    """Gone since it was listed: the agent's drain delivered or refused it meanwhile."""
    ref = row.ref
    doc = already_merged(dirs, path.name)  # without the record: its name says delivered
    if doc is not None:
        key, digest = row.key, row.digest
        if (
            key is None
            and isinstance(doc.get("dedupe_key"), str)
            and isinstance(doc.get("body"), str)
        ):
            # Never read by this run: the merged copy says which key the center now holds,
            # so later files with that key are settled against it, not sent.
            key, digest = doc["dedupe_key"], raw_body_digest(doc["body"].encode("utf-8"))
        return Settled(
            ResultRow(ref, key, row.file, "by_agent", doc.get("order_id"), None, None, digest), NOTE
        )
    if (dirs.rejected / path.name).exists():
        return Settled(
            ResultRow(
                ref,
                row.key,
                row.file,
                "rejected",
                error="refused while the agent delivered it: see rejected/",
            ),
            NOTE,
        )
    return Settled(
        ResultRow(
            ref,
            row.key,
            row.file,
            "pending",
            error="moved away by another process during the merge",
        ),
        NOTE,
    )


def _exists(dirs: BufferDirs, name: str) -> bool:
    return os.path.lexists(os.path.join(dirs.merged, name))


def merged_name(dirs: BufferDirs, wanted: str) -> str:
    """A free name in merged/ beside an unrelated file called ``wanted``."""
    stem = wanted.removesuffix(".json")
    n = 1
    while _exists(dirs, f"{stem}.{n}.json"):
        n += 1
    return f"{stem}.{n}.json"


def _mtime(claim: Claim) -> float:
    try:
        return os.stat(claim.where).st_mtime
    except OSError:
        return 0.0
