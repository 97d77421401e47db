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
pending past ``delivered_at + deadline``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base.batching import GroupCommit
from agent.chain.steps import ChainOrder
from agent.state.sqlite_db import SqliteDb

PENDING, VERIFIED, FAILED, OVERDUE = "pending", "verified", "failed", "overdue"
STATES = (VERIFIED, PENDING, FAILED, OVERDUE)

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


@dataclass(frozen=True)
class _Op:
    """Statements that commit together (an order and its step rows, never one alone)."""

    statements: tuple[tuple[str, tuple[Any, ...]], ...]
    durable: bool  # an enrolment: committed with synchronous=FULL


class Ledger:
    """Owns the ledger database and its group-commit writer."""

    def __init__(self, state_dir: str, steps: Sequence[str]) -> None:
        self._db = SqliteDb(
            Path(state_dir) / "chain.sqlite3", "chain ledger", SCHEMA, synchronous="NORMAL"
        )
        self._writer = GroupCommit[_Op]("chain-ledger", self._flush)
        self.steps = tuple(steps)
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

    async def stop(self) -> None:
        await self._writer.stop()
        await self._db.close()

    async def _flush(self, ops: list[_Op]) -> Sequence[None]:
        def apply(conn: sqlite3.Connection) -> None:
            for op in ops:
                for sql, params in op.statements:
                    conn.execute(sql, params)

        durable = any(op.durable for op in ops)
        await self._db.in_transaction(apply, synchronous="FULL" if durable else None)
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
            (
                "INSERT OR IGNORE INTO steps(serial, step, state, delivered_at, next_check) "
                "VALUES (?,?,?,?,0)",
                (order.serial, step, PENDING, delivered_at),
            )
            for step in self.steps
        ]
        return self._writer.enqueue(_Op(tuple(statements), True))

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
            )
        )

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
            str(step): {"state": _shown(state, delivered_at, deadline_s, now), "detail": detail}
            for step, state, detail, delivered_at in rows
            if step in self.steps
        }

    async def counts(self, deadline_s: float) -> dict[str, dict[str, int]]:
        """step -> {state: count}, every configured step and state present (0 included)."""
        rows = await self._db.read(
            "SELECT step, CASE WHEN state=? AND delivered_at + ? < ? THEN ? ELSE state END, "
            "COUNT(*) FROM steps GROUP BY 1, 2",
            (PENDING, deadline_s, time.time(), OVERDUE),
        )
        out = {step: dict.fromkeys(STATES, 0) for step in self.steps}
        for step, state, n in rows:
            if step in out:
                out[step][state] = int(n)
        return out

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


def _shown(state: str, delivered_at: float, deadline_s: float, now: float) -> str:
    return OVERDUE if state == PENDING and delivered_at + deadline_s < now else str(state)
