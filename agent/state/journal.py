"""The dedupe journal and the serial high-water mark, in SQLite (aiosqlite).

The journal is an index, not the truth for undelivered orders: the pending
files are. It is rebuilt from them at start-up (``reconcile``) and when the
two disagree the files win. Writes are group-committed with
``synchronous=FULL``: a row that an answer relies on (the intent that pins a
forward and its retries to one cluster under one serial, the serial
high-water mark) must survive a power cut, not only a kill -9. Group commit
shares one WAL fsync among all the rows of a batch.

Two kinds of row are committed behind the answer instead, because something
else already makes them durable: a "buffered" row (its pending file is the
truth) and a "forwarded" row (its intent is: after a crash, the intent tells a
lookup the serial and cluster, and a retry goes to that cluster with that
serial, whose center answers "duplicate").

A batch of nothing but "forwarded" rows is committed with ``synchronous=NORMAL``:
no fsync of its own. Losing such a commit to a power cut leaves the intent, as a
crash before the commit does, and the next durable commit's WAL fsync takes the
rows with it. Otherwise, with one client sending orders one after the other, each
order's intent would wait for the fsync of the order before's outcome: two fsyncs
per forwarded order, where the promise needs one. A "buffered" row keeps its
fsync: ``queued()`` must not let the drain move a file whose row is not durable.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.batching import GroupCommit
from agent.errors import PersistError
from agent.state.rows import insert_rows
from agent.state.sqlite_db import SqliteDb

log = logging.getLogger("agent.state")

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    dedupe_key  TEXT PRIMARY KEY,
    serial      TEXT NOT NULL UNIQUE,
    state       TEXT NOT NULL,
    cluster     TEXT,
    order_id    TEXT,
    digest      BLOB NOT NULL,
    received_at TEXT NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_state ON orders(state, received_at);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# States a journal row can take; "buffered" is the only undelivered one. "forwarding"
# is the intent written before an order is sent to a cluster: never acknowledged, it
# tells a retry after a crash which cluster may already hold the key.
FORWARDED, BUFFERED, MERGED, REJECTED = "forwarded", "buffered", "merged", "rejected"
FORWARDING = "forwarding"
ACKNOWLEDGED_STATES = frozenset({FORWARDED, BUFFERED, MERGED, REJECTED})


@dataclass(frozen=True)
class Entry:
    dedupe_key: str
    serial: str
    state: str
    cluster: str | None
    order_id: str | None
    digest: bytes
    received_at: str

    @property
    def acknowledged(self) -> bool:
        return self.state in ACKNOWLEDGED_STATES

    def public(self) -> dict[str, Any]:
        """For a buffered order, ``cluster`` is the one it is pinned to (may hold it)."""
        buffered = self.state == BUFFERED
        return {
            "serial": self.serial,
            "state": self.state,
            "cluster": None if buffered else self.cluster,
            "pinned_to": self.cluster if buffered else None,
            "order_id": self.order_id,
            "received_at": self.received_at,
        }


_COLUMNS = "dedupe_key, serial, state, cluster, order_id, digest, received_at"
_RECORD_HEAD = f"INSERT OR REPLACE INTO orders ({_COLUMNS}, updated_at) VALUES"
_BY_KEY = f"SELECT {_COLUMNS} FROM orders WHERE dedupe_key=?"
_BY_SERIAL = f"SELECT {_COLUMNS} FROM orders WHERE serial=?"
_UPDATE_IN_PLACE = (
    "UPDATE orders SET state=?, cluster=?, order_id=?, updated_at=? "
    "WHERE dedupe_key=? AND serial=? AND digest=? AND received_at=?"
)


@dataclass(frozen=True)
class _Op:
    sql: str
    params: tuple[Any, ...]
    # Run instead when ``sql`` changed no row (an in-place update whose row is not there).
    fallback: _Op | None = None
    # "INSERT ... VALUES" of ``sql``: a run of these ops goes in as multi-row statements
    # (agent.state.rows), one step each instead of one per row.
    rows_head: str | None = None
    # False: the row needs no fsync of its own (a "forwarded" row: its intent is
    # durable). A batch of only such ops commits without one (module docstring).
    durable: bool = True


class Journal:
    """Owns the SQLite connections (one writer, one reader) and the group-commit writer."""

    def __init__(self, state_dir: str) -> None:
        self._db = SqliteDb(
            Path(state_dir) / "journal.sqlite3", "journal", SCHEMA, synchronous="FULL"
        )
        self._writer = GroupCommit[_Op]("journal", self._flush)
        # Rows queued by ``record_behind`` and not yet committed, by key and by serial:
        # lookups see them at once, so a retry right after the 202 is a duplicate.
        self._queued_by_key: dict[str, Entry] = {}
        self._queued_by_serial: dict[str, Entry] = {}

    async def start(self) -> None:
        await self._db.open()
        self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()
        await self._db.close()

    # -- writes (group-committed) -------------------------------------------------

    async def _flush(self, ops: list[_Op]) -> Sequence[None]:
        groups = [
            (sql, list(group)) for sql, group in itertools.groupby(ops, key=lambda op: op.sql)
        ]

        def apply(conn: sqlite3.Connection) -> None:
            for sql, group in groups:
                first = group[0]
                if first.rows_head is not None:
                    insert_rows(conn, first.rows_head, len(first.params), [o.params for o in group])
                    continue
                if first.fallback is None:
                    conn.executemany(sql, [op.params for op in group])
                    continue
                for op in group:
                    if conn.execute(sql, op.params).rowcount == 0 and op.fallback is not None:
                        conn.execute(op.fallback.sql, op.fallback.params)

        durable = any(op.durable for op in ops)
        await self._db.in_transaction(apply, None if durable else "NORMAL")
        return [None] * len(ops)

    async def record(self, entry: Entry) -> None:
        """Insert or replace the row for ``entry.dedupe_key`` and wait for the commit."""
        await self._writer.submit(self._record_op(entry))

    def record_update_behind(self, entry: Entry) -> None:
        """``record_behind(entry)`` for a row this process just recorded with the same
        serial, digest and received_at: the "forwarded" row after its durable intent.

        The result is the same row; updating it in place touches the table and the state
        index only, where INSERT OR REPLACE deletes and re-inserts it in every index: about
        half the pages each commit writes to the WAL. Should the row not be there as
        expected, the full INSERT OR REPLACE runs instead, in the same transaction.
        """
        self._behind(
            entry,
            _Op(
                _UPDATE_IN_PLACE,
                (
                    entry.state,
                    entry.cluster,
                    entry.order_id,
                    time.time(),
                    entry.dedupe_key,
                    entry.serial,
                    entry.digest,
                    entry.received_at,
                ),
                fallback=self._record_op(entry),
                durable=False,
            ),
        )

    def record_behind(self, entry: Entry) -> None:
        """Queue the row and return at once; lookups see it before it is committed.

        Only for rows something else makes durable (module docstring): a "buffered" row
        whose pending file is fsync'd (should a crash take the row, start-up
        reconciliation indexes the file again), a "forwarded" row whose intent is
        committed. Until the commit, lookups by key or serial answer from memory; a
        failed commit keeps the row in memory (and logs) so this run still answers
        "duplicate" for it.
        """
        self._behind(entry, self._record_op(entry))

    def _behind(self, entry: Entry, op: _Op) -> None:
        self._queued_by_key[entry.dedupe_key] = entry
        self._queued_by_serial[entry.serial] = entry
        fut = self._writer.enqueue(op)

        def committed(done: asyncio.Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                log.error(
                    "journal row for %s not stored (its pending file or its intent stays;"
                    " start-up and retries rely on those): %s",
                    entry.serial,
                    "cancelled" if done.cancelled() else done.exception(),
                )
                return
            if self._queued_by_key.get(entry.dedupe_key) is entry:
                del self._queued_by_key[entry.dedupe_key]
            if self._queued_by_serial.get(entry.serial) is entry:
                del self._queued_by_serial[entry.serial]

        fut.add_done_callback(committed)

    def queued(self, serial: str) -> bool:
        """True while ``serial``'s row from ``record_behind`` is not committed yet.

        The drain leaves such a file alone: moving it to merged/ before its row is
        durable could, after a power cut, leave a delivered order the journal does not
        know (its serial unknown to lookups). After a failed commit it stays True: the
        file then waits in pending/ for the next start-up, which indexes it again.
        """
        return serial in self._queued_by_serial

    @staticmethod
    def _record_op(entry: Entry) -> _Op:
        return _Op(
            f"{_RECORD_HEAD} (?,?,?,?,?,?,?,?)",
            (
                entry.dedupe_key,
                entry.serial,
                entry.state,
                entry.cluster,
                entry.order_id,
                entry.digest,
                entry.received_at,
                time.time(),
            ),
            rows_head=_RECORD_HEAD,
        )

    async def mark(
        self, serial: str, state: str, cluster: str | None = None, order_id: Any = None
    ) -> None:
        await self._writer.submit(
            _Op(
                "UPDATE orders SET state=?, cluster=COALESCE(?, cluster), "
                "order_id=COALESCE(?, order_id), updated_at=? WHERE serial=?",
                (state, cluster, None if order_id is None else str(order_id), time.time(), serial),
            )
        )

    async def intend(self, serial: str, cluster: str | None) -> None:
        """Durably note the cluster a buffered order is about to be sent to (its pin)."""
        await self._writer.submit(self._intend_op(serial, cluster))

    def intend_soon(self, serial: str, cluster: str | None) -> None:
        """The same without waiting: for clearing a pin after a clear refusal."""
        self._writer.enqueue(self._intend_op(serial, cluster))

    @staticmethod
    def _intend_op(serial: str, cluster: str | None) -> _Op:
        return _Op(
            "UPDATE orders SET cluster=?, updated_at=? WHERE serial=? AND state=?",
            (cluster, time.time(), serial, BUFFERED),
        )

    # -- reads ---------------------------------------------------------------------

    async def by_key(self, dedupe_key: str) -> Entry | None:
        queued = self._queued_by_key.get(dedupe_key)
        if queued is not None:
            return queued
        return await self._one(_BY_KEY, dedupe_key)

    async def by_serial(self, serial: str) -> Entry | None:
        queued = self._queued_by_serial.get(serial)
        if queued is not None:
            return queued
        return await self._one(_BY_SERIAL, serial)

    async def _one(self, sql: str, value: str) -> Entry | None:
        rows = await self._db.read_inline(sql, (value,))  # a point read: no thread hop
        return Entry(*rows[0]) if rows else None

    async def pending_summary(self) -> tuple[int, str | None]:
        """(number of buffered orders, received_at of the oldest)."""
        rows = await self._db.read(
            "SELECT COUNT(*), MIN(received_at) FROM orders WHERE state=?", (BUFFERED,)
        )
        return (int(rows[0][0]), rows[0][1]) if rows else (0, None)

    async def pinned_counts(self) -> dict[str, int]:
        """Buffered orders per cluster they are pinned to ("none" for unpinned)."""
        rows = await self._db.read(
            "SELECT COALESCE(cluster, 'none'), COUNT(*) FROM orders WHERE state=? GROUP BY cluster",
            (BUFFERED,),
        )
        return {str(name): int(n) for name, n in rows}

    async def buffered_pins(self) -> dict[str, str | None]:
        """serial -> the cluster the journal says it may be at, for every buffered order."""
        rows = await self._db.read("SELECT serial, cluster FROM orders WHERE state=?", (BUFFERED,))
        return {str(serial): cluster for serial, cluster in rows}

    async def forwarded_to(self, cluster: str) -> list[Entry]:
        """Every order created at ``cluster`` by the forward path (the chain ledger's
        rebuild: the standby's orders are outage orders, CONTRACT 10)."""
        rows = await self._db.read(
            f"SELECT {_COLUMNS} FROM orders WHERE state=? AND cluster=?", (FORWARDED, cluster)
        )
        return [Entry(*row) for row in rows]

    async def buffered_serials(self) -> set[str]:
        rows = await self._db.read("SELECT serial FROM orders WHERE state=?", (BUFFERED,))
        return {str(row[0]) for row in rows}

    # -- serials -------------------------------------------------------------------

    async def reserve_serials(self, name: str, count: int, floor: int = 0) -> tuple[int, int]:
        """Durably move the high-water mark above ``floor`` by ``count``; return [first, last].

        Only one reservation per ``name`` may run at a time (the issuer's lock).
        """
        await self._writer.submit(
            _Op(
                "INSERT INTO meta(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = MAX(value, ?) + ?",
                (name, floor + count, floor, count),
            )
        )
        rows = await self._db.read("SELECT value FROM meta WHERE name=?", (name,))
        if not rows:
            raise PersistError(
                f"the serial reservation for {name} was not stored in {self._db.path}"
            )
        last = int(rows[0][0])
        return last - count + 1, last

    @property
    def rebuilt(self) -> Path | None:
        """Where a damaged journal was moved at start-up, if it was."""
        return self._db.rebuilt

    async def setting(self, name: str) -> str | None:
        rows = await self._db.read("SELECT value FROM settings WHERE name=?", (name,))
        return str(rows[0][0]) if rows else None

    async def set_setting(self, name: str, value: str) -> None:
        await self._writer.submit(
            _Op(
                "INSERT INTO settings(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
        )

    # -- maintenance ---------------------------------------------------------------

    async def prune(self, older_than_s: float) -> None:
        """Forget delivered orders past retention; buffered rows are never pruned."""
        await self._writer.submit(
            _Op(
                "DELETE FROM orders WHERE state != ? AND updated_at < ?",
                (BUFFERED, time.time() - older_than_s),
            )
        )
