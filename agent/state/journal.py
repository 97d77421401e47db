"""The dedupe journal and the serial high-water mark, in SQLite (aiosqlite).

The journal is an index, not the truth for undelivered orders: the pending
files are. It is rebuilt from them at start-up (``reconcile``) and when the
two disagree the files win. Writes are group-committed; the WAL runs with
``synchronous=NORMAL`` (a commit survives kill -9), except the serial
reservation, which is committed with ``synchronous=FULL`` so that a serial is
never issued twice even across a power loss.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from agent.errors import PersistError
from agent.state.batching import GroupCommit
from agent.state.sqlite_db import SqliteDb

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
"""

# States a journal row can take; "buffered" is the only undelivered one. "forwarding"
# is the intent written before an order is sent to a cluster: never acknowledged, it
# tells a retry after a crash which cluster may already hold the key.
FORWARDED, BUFFERED, MERGED, REJECTED = "forwarded", "buffered", "merged", "rejected"
FORWARDING = "forwarding"
ACKNOWLEDGED_STATES = frozenset({FORWARDED, BUFFERED, MERGED, REJECTED})


def body_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


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
        return {
            "serial": self.serial,
            "state": self.state,
            "cluster": self.cluster,
            "order_id": self.order_id,
            "received_at": self.received_at,
        }


_COLUMNS = "dedupe_key, serial, state, cluster, order_id, digest, received_at"


@dataclass(frozen=True)
class _Op:
    sql: str
    params: tuple[Any, ...]
    durable: bool = False  # commit this batch with synchronous=FULL


class Journal:
    """Owns the SQLite connections (one writer, one reader) and the group-commit writer."""

    def __init__(self, state_dir: str) -> None:
        # DEFERRED: the first write of a batch opens the transaction itself, so a
        # batch costs its statements plus one COMMIT round trip to the sqlite thread.
        self._db = SqliteDb(Path(state_dir) / "journal.sqlite3", "journal", SCHEMA,
                            synchronous="NORMAL", isolation_level="DEFERRED")
        self._writer = GroupCommit[_Op]("journal", self._flush)

    def _conn(self, reader: bool = False) -> aiosqlite.Connection:
        return self._db.reader if reader else self._db.writer

    async def start(self) -> None:
        await self._db.open()
        self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()
        await self._db.close()

    # -- writes (group-committed) -------------------------------------------------

    async def _flush(self, ops: list[_Op]) -> Sequence[None]:
        db = self._conn()
        durable = any(op.durable for op in ops)
        if durable:
            await db.execute("PRAGMA synchronous=FULL")
        try:
            try:
                for sql, group in itertools.groupby(ops, key=lambda op: op.sql):
                    await db.executemany(sql, [op.params for op in group])
                await db.commit()
            except Exception:
                await db.rollback()
                raise
        except Exception as exc:
            raise PersistError(f"journal write failed in {self._db.path}: {exc}") from exc
        finally:
            if durable:
                await db.execute("PRAGMA synchronous=NORMAL")
        return [None] * len(ops)

    async def record(self, entry: Entry) -> None:
        """Insert or replace the row for ``entry.dedupe_key`` and wait for the commit."""
        await self._writer.submit(self._record_op(entry))

    def record_soon(self, entry: Entry) -> asyncio.Future[None]:
        """Queue the row without waiting: for rows whose loss a crash may cost.

        The writer task owns it and flushes it with the next batch (also at stop());
        the future resolves when it is committed.
        """
        return self._writer.enqueue(self._record_op(entry))

    @staticmethod
    def _record_op(entry: Entry) -> _Op:
        return _Op(
            f"INSERT OR REPLACE INTO orders ({_COLUMNS}, updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (entry.dedupe_key, entry.serial, entry.state, entry.cluster, entry.order_id,
             entry.digest, entry.received_at, time.time()),
        )

    async def mark(self, serial: str, state: str, cluster: str | None = None,
                   order_id: Any = None) -> None:
        await self._writer.submit(_Op(
            "UPDATE orders SET state=?, cluster=COALESCE(?, cluster), "
            "order_id=COALESCE(?, order_id), updated_at=? WHERE serial=?",
            (state, cluster, None if order_id is None else str(order_id), time.time(), serial),
        ))

    # -- reads ---------------------------------------------------------------------

    async def by_key(self, dedupe_key: str) -> Entry | None:
        return await self._one("WHERE dedupe_key=?", dedupe_key)

    async def by_serial(self, serial: str) -> Entry | None:
        return await self._one("WHERE serial=?", serial)

    async def _one(self, where: str, value: str) -> Entry | None:
        sql = f"SELECT {_COLUMNS} FROM orders {where}"
        rows = list(await self._conn(reader=True).execute_fetchall(sql, (value,)))
        return Entry(*rows[0]) if rows else None  # one hop to the sqlite thread

    async def pending_summary(self) -> tuple[int, str | None]:
        """(number of buffered orders, received_at of the oldest)."""
        async with self._conn(reader=True).execute(
            "SELECT COUNT(*), MIN(received_at) FROM orders WHERE state=?", (BUFFERED,)
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), row[1]

    async def buffered_serials(self) -> set[str]:
        async with self._conn(reader=True).execute(
            "SELECT serial FROM orders WHERE state=?", (BUFFERED,)
        ) as cur:
            return {row[0] for row in await cur.fetchall()}

    # -- serials -------------------------------------------------------------------

    async def reserve_serials(self, name: str, count: int, floor: int = 0) -> tuple[int, int]:
        """Durably move the high-water mark above ``floor`` by ``count``; return [first, last].

        Only one reservation per ``name`` may run at a time (the issuer's lock).
        """
        await self._writer.submit(_Op(
            "INSERT INTO meta(name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = MAX(value, ?) + ?",
            (name, floor + count, floor, count),
            durable=True,
        ))
        async with self._conn(reader=True).execute(
            "SELECT value FROM meta WHERE name=?", (name,)
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        last = int(row[0])
        return last - count + 1, last

    # -- maintenance ---------------------------------------------------------------

    async def prune(self, older_than_s: float) -> None:
        """Forget delivered orders past retention; buffered rows are never pruned."""
        await self._writer.submit(_Op(
            "DELETE FROM orders WHERE state != ? AND updated_at < ?",
            (BUFFERED, time.time() - older_than_s),
        ))
