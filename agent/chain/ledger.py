"""The verification ledger: one row per outage order, one per (order, step), in SQLite.

Durable in ``state_dir/chain.sqlite3`` through ``SqliteDb`` and ``GroupCommit``
like the journal. An order's place (its enrolment) is committed with
``synchronous=FULL``: a power cut after it keeps it. A check's result is
committed at the base level (NORMAL): a power cut may lose the last results,
which costs a recheck, never an order's place. The ledger keeps the facts the
templates need (order_id, dedupe key, channel ids, received_at, the raw body),
so a check never depends on a merged/ file still being there.

A ledger SQLite cannot read is moved aside by ``SqliteDb`` and a new one is
created; ``fresh`` tells the verifier to rebuild it from merged/ and the journal.

A step's state is stored as pending, verified or failed; "overdue" is a view:
pending past ``delivered_at + deadline``. The counts per step and state live in
memory (``Tally``), moved by each commit, so /status never scans the ledger.

Rows of an order whose chain is finished are pruned after the keep period
(``prune``), so the ledger does not grow forever.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.batching import GroupCommit
from agent.chain.states import FAILED, OVERDUE, PENDING, STATES, VERIFIED
from agent.chain.steps import ChainOrder
from agent.chain.tally import Delta, Tally
from agent.state.sqlite_db import SqliteDb

__all__ = ["FAILED", "OVERDUE", "PENDING", "STATES", "VERIFIED", "Due", "Ledger"]
LEDGER_NAME = "chain.sqlite3"  # the agent's, in state_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    serial           TEXT PRIMARY KEY,
    order_id         TEXT,
    dedupe_key       TEXT NOT NULL,
    channel_id       TEXT,
    channel_order_id TEXT,
    received_at      TEXT NOT NULL,
    body             TEXT,
    delivered_at     REAL NOT NULL,
    source           TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    serial       TEXT NOT NULL,
    step         TEXT NOT NULL,
    state        TEXT NOT NULL,
    detail       TEXT NOT NULL DEFAULT '',
    delivered_at REAL NOT NULL,
    next_check   REAL NOT NULL,
    last_repair  REAL,
    checked_at   REAL,
    PRIMARY KEY (serial, step)
);
CREATE INDEX IF NOT EXISTS steps_due ON steps(next_check) WHERE state != 'verified';
"""
# The due queries spell 'verified' out (not a bound parameter): SQLite uses a partial
# index only when the query's WHERE visibly implies the index's.

_ORDER_COLUMNS = "serial, order_id, dedupe_key, channel_id, channel_order_id, received_at, body"


@dataclass(frozen=True)
class Due:
    """One step of one order whose check is due."""

    order: ChainOrder
    step: str
    state: str
    last_repair: float | None

    @property
    def key(self) -> tuple[str, str]:
        return self.order.serial, self.step


_ENROL, _RECORD, _OTHER = "enrol", "record", "other"
_INSERT_STEP = (
    "INSERT OR IGNORE INTO steps(serial, step, state, delivered_at, next_check) VALUES (?,?,?,?,0)"
)
_OLD_STATE = "SELECT state, delivered_at FROM steps WHERE serial=? AND step=?"


@dataclass(frozen=True)
class _Op:
    """Statements that commit together (an order and its step rows, never one alone)."""

    statements: tuple[tuple[str, tuple[Any, ...]], ...]
    durable: bool  # an enrolment: committed with synchronous=FULL
    kind: str = _OTHER  # what the statements change in the counts


class Ledger:
    """Owns the ledger database and its group-commit writer."""

    def __init__(self, path: Path, steps: Sequence[str]) -> None:
        self._db = SqliteDb(path, "chain ledger", SCHEMA, synchronous="NORMAL")
        self._writer = GroupCommit[_Op]("chain-ledger", self._flush)
        self.steps = tuple(steps)
        self.tally = Tally(self.steps)
        self.fresh = False  # created new (first start, or moved aside as damaged)

    @property
    def path(self) -> Path:
        return self._db.path

    async def start(self) -> None:
        existed = self._db.path.exists()
        await self._db.open()
        self.fresh = not existed or self._db.rebuilt is not None
        self._writer.start()
        # A step added to the config since: every enrolled order gets it, from pending.
        for step in self.steps:
            await self._writer.submit(
                _Op(
                    (
                        (
                            "INSERT OR IGNORE INTO steps"
                            "(serial, step, state, delivered_at, next_check) "
                            "SELECT serial, ?, ?, delivered_at, 0 FROM orders",
                            (step, PENDING),
                        ),
                    ),
                    True,
                )
            )
        self.tally = Tally(self.steps)
        self.tally.apply(await self._stored_counts())

    async def _stored_counts(self) -> list[Delta]:
        """The counts as stored: one scan, at start only (the tally is moved after)."""
        rows = await self._db.read(
            "SELECT step, state, CASE WHEN state=? THEN CAST(delivered_at AS INTEGER) ELSE 0 "
            "END, COUNT(*) FROM steps GROUP BY 1, 2, 3",
            (PENDING,),
        )
        return [(str(step), str(state), float(second), int(n)) for step, state, second, n in rows]

    async def stop(self) -> None:
        await self._writer.stop()
        await self._db.close()

    async def _flush(self, ops: list[_Op]) -> Sequence[None]:
        def apply(conn: sqlite3.Connection) -> list[Delta]:
            deltas: list[Delta] = []
            for op in ops:
                for sql, params in op.statements:
                    if op.kind == _RECORD:
                        deltas += _recorded(conn, sql, params)
                        continue
                    cursor = conn.execute(sql, params)
                    if op.kind == _ENROL and sql is _INSERT_STEP and cursor.rowcount == 1:
                        deltas.append((params[1], PENDING, params[3], 1))
            return deltas

        durable = any(op.durable for op in ops)
        deltas = await self._db.in_transaction(apply, synchronous="FULL" if durable else None)
        self.tally.apply(deltas)  # committed: only now do the counts move
        return [None] * len(ops)

    # -- writes --------------------------------------------------------------------------

    def enrol(self, order: ChainOrder, delivered_at: float, source: str) -> asyncio.Future[None]:
        """Queue the order and a pending row per step; the future says when committed.

        An order already enrolled keeps its place and its states; a fact it lacked
        (order_id, body) is filled in.
        """
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (
                f"INSERT INTO orders ({_ORDER_COLUMNS}, delivered_at, source) "
                "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(serial) DO UPDATE SET "
                "order_id=COALESCE(orders.order_id, excluded.order_id), "
                "body=COALESCE(orders.body, excluded.body), "
                "channel_id=COALESCE(orders.channel_id, excluded.channel_id), "
                "channel_order_id=COALESCE(orders.channel_order_id, excluded.channel_order_id)",
                (
                    order.serial,
                    order.order_id,
                    order.dedupe_key,
                    order.channel_id,
                    order.channel_order_id,
                    order.received_at,
                    order.body,
                    delivered_at,
                    source,
                ),
            )
        ]
        statements += [
            (_INSERT_STEP, (order.serial, step, PENDING, delivered_at)) for step in self.steps
        ]
        return self._writer.enqueue(_Op(tuple(statements), True, _ENROL))

    async def record(
        self,
        serial: str,
        step: str,
        state: str,
        detail: str,
        next_check: float,
        last_repair: float | None,
    ) -> None:
        """A check's result; waits for the commit (at the base level: may cost a recheck)."""
        await self._writer.submit(
            _Op(
                (
                    (
                        "UPDATE steps SET state=?, detail=?, next_check=?, last_repair=?, "
                        "checked_at=? WHERE serial=? AND step=?",
                        (state, detail, next_check, last_repair, time.time(), serial, step),
                    ),
                ),
                False,
                _RECORD,
            )
        )

    async def set_order_id(self, serial: str, order_id: str) -> None:
        """The center's order_id, learnt after the order was enrolled without it."""
        await self._writer.submit(
            _Op(
                (
                    (
                        "UPDATE orders SET order_id=? WHERE serial=? AND order_id IS NULL",
                        (order_id, serial),
                    ),
                ),
                False,
            )
        )

    async def prune(
        self, before: float, keep: Callable[[list[str]], Awaitable[set[str]]]
    ) -> list[str]:
        """Forget orders delivered before ``before`` whose chain is finished, except the
        serials ``keep`` (given the candidates) returns; the serials forgotten."""
        marks = ",".join("?" * len(self.steps))
        rows = await self._db.read(
            f"SELECT serial FROM orders WHERE delivered_at < ? AND serial NOT IN (SELECT serial "
            f"FROM steps WHERE state='pending' AND step IN ({marks}))",
            (before, *self.steps),
        )
        serials = [str(r[0]) for r in rows]
        kept = await keep(serials) if serials else set()
        gone = [s for s in serials if s not in kept]
        for i in range(0, len(gone), 500):
            chunk = gone[i : i + 500]
            deltas = await self._db.in_transaction(functools.partial(_forget, serials=chunk))
            self.tally.apply(deltas)
        return gone

    # -- reads ---------------------------------------------------------------------------

    async def serials(self) -> set[str]:
        rows = await self._db.read("SELECT serial FROM orders")
        return {str(r[0]) for r in rows}

    async def due(self, now: float, limit: int) -> list[Due]:
        marks = ",".join("?" * len(self.steps))
        rows = await self._db.read(
            f"SELECT o.serial, o.order_id, o.dedupe_key, o.channel_id, o.channel_order_id, "
            f"o.received_at, o.body, s.step, s.state, s.last_repair "
            f"FROM steps s JOIN orders o ON o.serial = s.serial "
            f"WHERE s.state != 'verified' AND s.next_check <= ? AND s.step IN ({marks}) "
            f"ORDER BY s.next_check LIMIT ?",
            (now, *self.steps, limit),
        )
        return [Due(ChainOrder(*row[:7]), row[7], row[8], row[9]) for row in rows]

    async def next_check(self) -> float | None:
        marks = ",".join("?" * len(self.steps))
        rows = await self._db.read(
            f"SELECT MIN(next_check) FROM steps WHERE state != 'verified' AND step IN ({marks})",
            self.steps,
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def chain_of(self, serial: str, deadline_s: float) -> dict[str, dict[str, Any]]:
        """step -> {state, detail} for one order ({} if it is not an outage order)."""
        rows = await self._db.read_inline(
            "SELECT step, state, detail, delivered_at FROM steps WHERE serial=?", (serial,)
        )
        now = time.time()
        return {
            str(step): {
                "state": shown_state(state, delivered_at, deadline_s, now),
                "detail": detail,
            }
            for step, state, detail, delivered_at in rows
            if step in self.steps
        }

    def counts(self, deadline_s: float) -> dict[str, dict[str, int]]:
        """step -> {state: count}, every configured step and state present (0 included);
        from memory, never a scan of the ledger."""
        return self.tally.view(deadline_s, time.time())

    async def outstanding(self, after: tuple[str, str], limit: int) -> list[Due]:
        """Steps not verified, in (serial, step) order after ``after``: one pass over the
        ledger by its primary key (edge-recover --mode chain checks each once)."""
        marks = ",".join("?" * len(self.steps))
        rows = await self._db.read(
            f"SELECT o.serial, o.order_id, o.dedupe_key, o.channel_id, o.channel_order_id, "
            f"o.received_at, o.body, s.step, s.state, s.last_repair "
            f"FROM steps s JOIN orders o ON o.serial = s.serial "
            f"WHERE (s.serial, s.step) > (?, ?) AND s.state != 'verified' "
            f"AND s.step IN ({marks}) ORDER BY s.serial, s.step LIMIT ?",
            (*after, *self.steps, limit),
        )
        return [Due(ChainOrder(*row[:7]), row[7], row[8], row[9]) for row in rows]

    async def problems(self, deadline_s: float, limit: int = 1000) -> list[dict[str, Any]]:
        """Failed and overdue steps with what was wrong, oldest first (for ops)."""
        rows = await self._db.read(
            "SELECT s.serial, o.order_id, o.dedupe_key, s.step, "
            "CASE WHEN s.state=? THEN ? ELSE s.state END, s.detail, s.delivered_at "
            "FROM steps s JOIN orders o ON o.serial = s.serial "
            "WHERE s.state=? OR (s.state=? AND s.delivered_at + ? < ?) "
            "ORDER BY s.delivered_at LIMIT ?",
            (PENDING, OVERDUE, FAILED, PENDING, deadline_s, time.time(), limit),
        )
        keys = ("serial", "order_id", "dedupe_key", "step", "state", "detail", "delivered_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    async def finished(self) -> set[str]:
        """Serials no configured step of which is still pending (verified or reported)."""
        marks = ",".join("?" * len(self.steps))
        rows = await self._db.read(
            f"SELECT serial FROM orders WHERE serial NOT IN (SELECT serial FROM steps "
            f"WHERE state=? AND step IN ({marks}))",
            (PENDING, *self.steps),
        )
        return {str(r[0]) for r in rows}


def _recorded(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Delta]:
    """Apply one check's result; the change of state it makes (none if the row is gone)."""
    state, serial, step = params[0], params[-2], params[-1]
    old = conn.execute(_OLD_STATE, (serial, step)).fetchone()
    conn.execute(sql, params)
    if old is None or old[0] == state:
        return []
    return [(step, str(old[0]), float(old[1]), -1), (step, state, float(old[1]), 1)]


def _forget(conn: sqlite3.Connection, serials: list[str]) -> list[Delta]:
    marks = ",".join("?" * len(serials))
    rows = conn.execute(
        f"SELECT step, state, delivered_at FROM steps WHERE serial IN ({marks})", serials
    ).fetchall()
    conn.execute(f"DELETE FROM steps WHERE serial IN ({marks})", serials)
    conn.execute(f"DELETE FROM orders WHERE serial IN ({marks})", serials)
    return [(str(step), str(state), float(at), -1) for step, state, at in rows]


def shown_state(state: str, delivered_at: float, deadline_s: float, now: float) -> str:
    """The state as people see it: pending past the deadline is overdue."""
    return OVERDUE if state == PENDING and delivered_at + deadline_s < now else str(state)
