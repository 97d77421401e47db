"""The SMS outbox table and the per-phone sliding window, in ``state_dir/outbox.sqlite3``.

One row per serial (the primary key: a serial can never get a second row).
States::

    queued ──► sending ──► sent
      ▲          │ ├─────► failed      refused for good, or not sent within give_up_after_s
      └──────────┘ └─────► ambiguous   sent but unanswered, or found "sending" at start-up
    skipped      no valid phone, or found too late at start-up
    suppressed   sms.per_phone_per_hour reached

Writes are group-committed. A batch that moves any row (to "sending" above all)
commits with ``synchronous=FULL``, so a row that said "sending" before a crash or
a power loss still says so afterwards. The sender needs one such commit per
round: ``claim`` records the outcomes of the round just sent and marks the next
round's rows "sending" in one transaction, before any of them is sent. A batch
of new rows only commits with ``synchronous=NORMAL``: it survives kill -9, and
should a power loss take it, the start-up backfill queues it again from its
pending file (the files are the truth); this keeps an fsync off the path of
every buffered order's 202. Once a row is final its phone is replaced by the
masked form; the window rows that the rate limit needs are deleted after an hour.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.base.batching import GroupCommit
from agent.base.phones import mask
from agent.sms.window import WINDOW_S
from agent.state.rows import ROWS_PER_STATEMENT, insert_rows
from agent.state.sqlite_db import SqliteDb

QUEUED, SENDING, SENT, FAILED = "queued", "sending", "sent", "failed"
SUPPRESSED, SKIPPED, AMBIGUOUS = "suppressed", "skipped", "ambiguous"
STATES = (QUEUED, SENDING, SENT, FAILED, SUPPRESSED, SKIPPED, AMBIGUOUS)
OPEN = (QUEUED, SENDING)

# Each sender round runs both. The expired rows are found by age (sms_expiry), never by
# walking the due ones: during a peak the backlog of queued notices is thousands of rows,
# and a walk of them per round of sms.concurrency notices (9.6 ms at 20,000) held the
# outbox's SQLite connection, which the intake's 202s wait on too.
EXPIRED_SQL = (
    "SELECT serial, phone, attempts, created_at FROM sms INDEXED BY sms_expiry "
    "WHERE state=? AND created_at<? AND next_at<=?"
)
# A new outbox row and its window row ("... VALUES": one row, or many, agent.state.rows).
_NEW_ROW = "INSERT INTO sms (serial, phone, state, reason, created_at, next_at, updated_at) VALUES"
_NEW_WINDOW_ROW = "INSERT INTO sms_window (phone, at) VALUES"
DUE_SQL = (
    "SELECT serial, phone, attempts, created_at FROM sms INDEXED BY sms_due "
    "WHERE state=? AND next_at<=? ORDER BY next_at LIMIT ?"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sms (
    serial      TEXT PRIMARY KEY,
    phone       TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    next_at     REAL NOT NULL,
    updated_at  REAL NOT NULL,
    provider_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS sms_due ON sms(state, next_at);
CREATE INDEX IF NOT EXISTS sms_expiry ON sms(state, created_at);
CREATE TABLE IF NOT EXISTS sms_window (
    phone TEXT NOT NULL,
    at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sms_window_phone ON sms_window(phone, at);
"""


@dataclass(frozen=True)
class Row:
    serial: str
    phone: str
    attempts: int
    created_at: float


@dataclass(frozen=True)
class Claimed:
    rows: list[Row]  # now "sending": to be sent
    expired: list[Row]  # now "failed": not sent within give_up_after_s
    next_due: float | None  # when no row was claimed: the next queued row's next_at


@dataclass
class _Enqueue:
    serial: str
    phone: str | None  # normalized, or None when invalid
    raw_phone: str
    reason: str  # why it is skipped (when phone is None or too old)
    limit: int
    result: str = ""
    inserted: bool = False
    state: str | None = None  # a forced state (ambiguous after a rebuild)
    decided: str | None = None  # queued/skipped/suppressed, decided by the intake


@dataclass
class Transition:
    serial: str
    state: str
    phone: str
    reason: str
    next_at: float
    attempts: int
    provider_id: str
    only_from: str  # the state the row must be in, or the update does nothing
    result: str = ""
    inserted: bool = False


@dataclass
class _Prune:
    before: float


@dataclass
class _Claim:
    """The sender's round: ``done`` (the last round's outcomes) are applied; due rows
    created before ``give_up_before`` become "failed" (``expired``); then up to ``limit``
    due rows move queued -> sending (attempts + 1) and come back in ``rows``."""

    done: list[Transition]
    now: float
    limit: int
    give_up_before: float
    rows: list[Row] = field(default_factory=list)
    expired: list[Row] = field(default_factory=list)
    next_due: float | None = None


_Op = _Enqueue | Transition | _Prune | _Claim


def transition(
    row: Row,
    from_state: str,
    to_state: str,
    *,
    reason: str = "",
    next_at: float = 0.0,
    attempts: int | None = None,
    provider_id: str = "",
) -> Transition:
    """The update moving ``row`` from ``from_state`` to ``to_state``, for ``move`` or
    ``claim``; a final state keeps only the masked phone."""
    final = to_state not in OPEN
    return Transition(
        row.serial,
        to_state,
        mask(row.phone) if final else row.phone,
        reason,
        next_at,
        row.attempts if attempts is None else attempts,
        provider_id,
        from_state,
    )


class OutboxStore:
    """Owns the outbox's SQLite connections (one writer, one reader) and its group commit."""

    def __init__(self, state_dir: str) -> None:
        self._db = SqliteDb(
            Path(state_dir) / "outbox.sqlite3", "SMS outbox", SCHEMA, synchronous="NORMAL"
        )
        self.path = self._db.path
        self._writer = GroupCommit[_Op]("sms-outbox", self._flush)
        # Rows the intake queued without waiting (``enqueue_behind``), until committed.
        self._behind: dict[str, asyncio.Future[None]] = {}

    async def open(self) -> None:
        await self._db.open()
        self._writer.start()

    async def close(self) -> None:
        await self._writer.stop()
        await self._db.close()

    # -- writes ------------------------------------------------------------------------

    async def _flush(self, ops: list[_Op]) -> Sequence[None]:
        durable = any(isinstance(op, (Transition, _Claim)) for op in ops)

        def apply(db: sqlite3.Connection) -> None:  # on the SQLite thread: one hop per batch
            enqueues: list[_Enqueue] = []
            for op in ops:
                if isinstance(op, _Enqueue):
                    enqueues.append(op)
                    continue
                if enqueues:  # a run of new rows goes in before the op that follows it
                    self._apply_enqueues(db, enqueues)
                    enqueues = []
                if isinstance(op, Transition):
                    self._apply_update(db, op)
                elif isinstance(op, _Claim):
                    self._apply_claim(db, op)
                else:
                    db.execute("DELETE FROM sms_window WHERE at < ?", (op.before,))
            if enqueues:
                self._apply_enqueues(db, enqueues)

        await self._db.in_transaction(apply, "FULL" if durable else None)
        return [None] * len(ops)

    @staticmethod
    def _apply_enqueues(db: sqlite3.Connection, ops: list[_Enqueue]) -> None:
        """``_apply_enqueue`` for each of ``ops`` in order, with the same outcome, in a
        few statements: one read of the rows already there, multi-row inserts (one step
        each, not three per order: agent.state.rows says why). An op whose state needs
        the window's count in SQLite (none the intake decided) goes alone, after the rows
        before it are in."""
        known: dict[str, str] = {}
        for start in range(0, len(ops), ROWS_PER_STATEMENT):
            part = {op.serial for op in ops[start : start + ROWS_PER_STATEMENT]}
            known.update(
                db.execute(
                    f"SELECT serial, state FROM sms WHERE serial IN ({','.join('?' * len(part))})",
                    list(part),
                ).fetchall()
            )
        sms: list[tuple[object, ...]] = []
        window: list[tuple[object, ...]] = []

        def insert() -> None:
            insert_rows(db, _NEW_ROW, 7, sms)
            insert_rows(db, _NEW_WINDOW_ROW, 2, window)
            sms.clear()
            window.clear()

        now = time.time()
        for op in ops:
            if op.serial in known:
                op.result = known[op.serial]
                continue
            decided = _decided(op)
            if decided is None:  # the window's count in SQLite decides: the old way
                insert()
                OutboxStore._apply_enqueue(db, op)
                known[op.serial] = op.result
                continue
            state, phone, reason = decided
            sms.append((op.serial, phone, state, reason, now, now, now))
            if state == QUEUED:
                window.append((phone, now))
            known[op.serial] = state
            op.result, op.inserted = state, True
        insert()

    @staticmethod
    def _apply_enqueue(db: sqlite3.Connection, op: _Enqueue) -> None:
        rows = db.execute("SELECT state FROM sms WHERE serial=?", (op.serial,)).fetchall()
        if rows:
            op.result = str(rows[0][0])
            return
        now = time.time()
        decided = _decided(op)
        if decided is None:
            state, phone, reason = QUEUED, op.phone or "", op.reason
            count = db.execute(
                "SELECT COUNT(*) FROM sms_window WHERE phone=? AND at>?", (op.phone, now - WINDOW_S)
            ).fetchall()
            if count and int(count[0][0]) >= op.limit:
                state, phone = SUPPRESSED, mask(phone)
                reason = f"sms.per_phone_per_hour ({op.limit}) reached for this phone"
        else:
            state, phone, reason = decided
        db.execute(f"{_NEW_ROW} (?,?,?,?,?,?,?)", (op.serial, phone, state, reason, now, now, now))
        if state == QUEUED:
            db.execute(f"{_NEW_WINDOW_ROW} (?,?)", (phone, now))
        op.result, op.inserted = state, True

    @staticmethod
    def _apply_update(db: sqlite3.Connection, op: Transition) -> None:
        cur = db.execute(
            "UPDATE sms SET state=?, phone=?, reason=?, next_at=?, attempts=?, provider_id=?, "
            "updated_at=? WHERE serial=? AND state=?",
            (
                op.state,
                op.phone,
                op.reason,
                op.next_at,
                op.attempts,
                op.provider_id,
                time.time(),
                op.serial,
                op.only_from,
            ),
        )
        op.inserted = cur.rowcount == 1
        op.result = op.state if op.inserted else ""

    @classmethod
    def _apply_claim(cls, db: sqlite3.Connection, op: _Claim) -> None:
        for update in op.done:
            cls._apply_update(db, update)
        now = time.time()
        for serial, phone, attempts, created_at in db.execute(
            EXPIRED_SQL, (QUEUED, op.give_up_before, op.now)
        ).fetchall():
            row = Row(serial, phone, attempts, created_at)
            cls._apply_update(
                db, transition(row, QUEUED, FAILED, reason="not sent within sms.give_up_after_s")
            )
            op.expired.append(row)
        for serial, phone, attempts, created_at in db.execute(
            DUE_SQL, (QUEUED, op.now, op.limit)
        ).fetchall():
            db.execute(
                "UPDATE sms SET state=?, attempts=?, updated_at=? WHERE serial=? AND state=?",
                (SENDING, attempts + 1, now, serial, QUEUED),
            )
            op.rows.append(Row(serial, phone, attempts + 1, created_at))
        if not op.rows:
            found = db.execute("SELECT MIN(next_at) FROM sms WHERE state=?", (QUEUED,)).fetchall()
            op.next_due = float(found[0][0]) if found and found[0][0] is not None else None

    @property
    def rebuilt(self) -> Path | None:
        """Where a damaged outbox was moved at start-up: what it knew is unknown now."""
        return self._db.rebuilt

    async def enqueue(
        self,
        serial: str,
        phone: str | None,
        raw_phone: str,
        reason: str,
        limit: int,
        state: str | None = None,
    ) -> tuple[str, bool]:
        """Add the row for ``serial`` unless it exists; (its state, whether it is new)."""
        op = _Enqueue(serial, phone, raw_phone, reason, limit, state=state)
        await self._writer.submit(op)
        return op.result, op.inserted

    def enqueue_behind(
        self, serial: str, phone: str | None, raw_phone: str, reason: str, decided: str, limit: int
    ) -> asyncio.Future[str | None]:
        """Queue the row for ``serial`` in the state the intake ``decided`` (queued,
        skipped, suppressed), without waiting. The future gives the new row's state once
        committed (None: the serial had a row already), or the error; reads of this
        store wait for it (``_written``)."""
        op = _Enqueue(serial, phone, raw_phone, reason, limit, decided=decided)
        flushed = self._writer.enqueue(op)
        self._behind[serial] = flushed
        out: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future[None]) -> None:
            self._behind.pop(serial, None)
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif (exc := f.exception()) is not None:
                out.set_exception(exc)
            else:
                out.set_result(op.result if op.inserted else None)

        flushed.add_done_callback(done)
        return out

    async def _written(self, serial: str | None = None) -> None:
        """Wait for rows queued behind (one serial's, or all) to be committed or failed."""
        waiting = (
            list(self._behind.values())
            if serial is None
            else [f for f in (self._behind.get(serial),) if f is not None]
        )
        if waiting:
            await asyncio.wait(waiting)

    async def window(self, now: float) -> list[tuple[str, float]]:
        """(phone, at) of the notices queued within the window, oldest first."""
        rows = await self._db.read(
            "SELECT phone, at FROM sms_window WHERE at > ? ORDER BY at", (now - WINDOW_S,)
        )
        return [(str(phone), float(at)) for phone, at in rows]

    async def move(
        self,
        row: Row,
        from_state: str,
        to_state: str,
        *,
        reason: str = "",
        next_at: float = 0.0,
        attempts: int | None = None,
        provider_id: str = "",
    ) -> bool:
        """Move ``row`` from ``from_state`` to ``to_state``; False if it was not there."""
        op = transition(
            row,
            from_state,
            to_state,
            reason=reason,
            next_at=next_at,
            attempts=attempts,
            provider_id=provider_id,
        )
        await self._writer.submit(op)
        return op.inserted

    async def claim(
        self, done: list[Transition], now: float, limit: int, give_up_before: float
    ) -> Claimed:
        """One sender round in one transaction, committed with FULL: record ``done`` (the
        last round's transitions; each one's ``inserted`` says whether it applied), fail
        the due rows created before ``give_up_before``, and mark up to ``limit`` due
        rows "sending". The rows returned may be sent: their "sending" mark is on disk.
        """
        op = _Claim(done, now, limit, give_up_before)
        await self._writer.submit(op)
        return Claimed(op.rows, op.expired, op.next_due)

    async def sending_to_ambiguous(self, reason: str) -> list[str]:
        """At start-up: every row still "sending" was interrupted mid-call."""
        rows = [
            Row(*r)
            for r in await self._db.read(
                "SELECT serial, phone, attempts, created_at FROM sms WHERE state=?", (SENDING,)
            )
        ]
        for row in rows:
            await self.move(row, SENDING, AMBIGUOUS, reason=reason)
        return [row.serial for row in rows]

    async def prune_window(self) -> None:
        """Forget sends older than the window: the limit no longer needs those phones."""
        await self._writer.submit(_Prune(time.time() - WINDOW_S))

    # -- reads -------------------------------------------------------------------------

    async def counts(self) -> Counter[str]:
        await self._written()
        rows = await self._db.read("SELECT state, COUNT(*) FROM sms GROUP BY state")
        return Counter({str(s): int(n) for s, n in rows})

    async def serials(self) -> set[str]:
        await self._written()
        return {str(r[0]) for r in await self._db.read("SELECT serial FROM sms")}

    async def notice_of(self, serial: str) -> tuple[str, str, str, float] | None:
        """(state, phone, reason, updated_at) of one serial's notice; the phone as stored
        (masked once final, normalized while open: callers mask it)."""
        await self._written(serial)
        rows = await self._db.read(
            "SELECT state, phone, reason, updated_at FROM sms WHERE serial=?", (serial,)
        )
        if not rows:
            return None
        row = rows[0]
        return str(row[0]), str(row[1]), str(row[2] or ""), float(row[3] or 0.0)

    async def state_of(self, serial: str) -> tuple[str, str] | None:
        """(state, reason) of one serial's notice, for tests and ops."""
        await self._written(serial)
        rows = await self._db.read("SELECT state, reason FROM sms WHERE serial=?", (serial,))
        return None if not rows else (str(rows[0][0]), str(rows[0][1]))


def _decided(op: _Enqueue) -> tuple[str, str, str] | None:
    """(state, phone as stored, reason) of a new row, or None when the per-phone window's
    count in SQLite decides (a valid phone, a limit, and no decision by the intake)."""
    if op.state is not None:
        return op.state, mask(op.raw_phone), op.reason
    if op.decided == SUPPRESSED:
        reason = f"sms.per_phone_per_hour ({op.limit}) reached for this phone"
        return SUPPRESSED, mask(op.phone or op.raw_phone), reason
    if op.decided == QUEUED:
        return QUEUED, op.phone or "", op.reason
    if op.phone is None or op.reason:
        return SKIPPED, mask(op.raw_phone), op.reason
    if op.limit > 0:
        return None
    return QUEUED, op.phone, op.reason
