"""The SMS sender's per-round queries stay cheap however long the backlog grows.

Every round (``sms.concurrency`` notices) looks for expired rows and claims the next
due ones. During a peak with a slow gateway the outbox holds thousands of queued
notices; a query that walks them all per round made the sender's rounds and the
intake's outbox commits (the same connection) slower as the backlog grew.
"""

from __future__ import annotations

import sqlite3
import time

from agent.sms.store import DUE_SQL, EXPIRED_SQL, QUEUED, SCHEMA

BACKLOG = 20_000


def _outbox(expired: int) -> tuple[sqlite3.Connection, float]:
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    now = time.time()
    rows = [
        # the oldest ``expired`` rows were created more than an hour ago
        (f"S-{n:06d}", "13800000000", QUEUED, now - (4000 if n < expired else n * 0.01))
        for n in range(BACKLOG)
    ]
    db.executemany(
        "INSERT INTO sms (serial, phone, state, created_at, next_at, updated_at) "
        "VALUES (?,?,?,?,?,?)",
        [(s, p, st, c, c, c) for s, p, st, c in rows],
    )
    return db, now


def _plan(db: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> str:
    return " ".join(str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args))


def test_expired_rows_are_found_by_age_not_by_walking_the_backlog() -> None:
    db, now = _outbox(expired=3)
    args = (QUEUED, now - 3600, now)
    found = db.execute(EXPIRED_SQL, args).fetchall()
    assert sorted(r[0] for r in found) == ["S-000000", "S-000001", "S-000002"]
    plan = _plan(db, EXPIRED_SQL, args)
    assert "sms_expiry (state=? AND created_at<?)" in plan, plan


def test_the_next_due_rows_come_in_due_order_from_the_index() -> None:
    db, now = _outbox(expired=0)
    args = (QUEUED, now, 4)
    due = [r[0] for r in db.execute(DUE_SQL, args)]
    assert due == ["S-019999", "S-019998", "S-019997", "S-019996"]  # oldest next_at first
    plan = _plan(db, DUE_SQL, args)
    assert "sms_due (state=? AND next_at<?)" in plan and "TEMP B-TREE" not in plan, plan
