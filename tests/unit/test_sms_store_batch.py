"""New outbox rows go in as a batch (``_apply_enqueues``) with exactly the outcome of one
by one (``_apply_enqueue``): the same rows, states, masked phones, window rows, and the
same answer to each caller, duplicates and the window's limit included."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from agent.sms.store import (
    AMBIGUOUS,
    QUEUED,
    SCHEMA,
    SKIPPED,
    SUPPRESSED,
    OutboxStore,
    _Enqueue,
)
from agent.state.rows import ROWS_PER_STATEMENT

PHONE = "13812345678"


def _ops() -> list[_Enqueue]:
    ops = [
        _Enqueue("S-1", PHONE, PHONE, "", 3, decided=QUEUED),  # as the intake queues
        _Enqueue("S-2", PHONE, PHONE, "", 3, decided=SUPPRESSED),
        _Enqueue("S-3", None, "12", "not a mobile", 3, decided=SKIPPED),
        _Enqueue("S-4", PHONE, PHONE, "", 3, state=AMBIGUOUS),  # a rebuilt row
        _Enqueue("S-1", PHONE, PHONE, "", 3, decided=QUEUED),  # a second row of a serial
        _Enqueue("S-OLD", PHONE, PHONE, "", 3, decided=QUEUED),  # there before the batch
        # The backfill: no decision, the window's count in SQLite decides. The phone
        # has 1 row before the batch and S-1's in it: the first is queued (3rd of 3),
        # the second suppressed, the third has no limit.
        _Enqueue("S-5", "13900000000", "139 0000 0000", "", 2),
        _Enqueue("S-6", PHONE, PHONE, "", 3),
        _Enqueue("S-7", PHONE, PHONE, "", 3),
        _Enqueue("S-8", PHONE, PHONE, "", 0),
    ]
    # More than one statement's worth, to cross the chunks of the read and the inserts.
    ops += [
        _Enqueue(f"T-{n}", f"1390000{n:04d}", f"1390000{n:04d}", "", 3, decided=QUEUED)
        for n in range(ROWS_PER_STATEMENT + 5)
    ]
    return ops


def _outcome(apply: Callable[[sqlite3.Connection, list[_Enqueue]], None]) -> tuple[object, ...]:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.executescript(SCHEMA)
    now = time.time()
    db.execute(
        "INSERT INTO sms (serial, phone, state, reason, created_at, next_at, updated_at) "
        "VALUES ('S-OLD', ?, 'sent', '', ?, ?, ?)",
        (PHONE, now, now, now),
    )
    db.execute("INSERT INTO sms_window (phone, at) VALUES (?, ?)", (PHONE, now))
    ops = _ops()
    db.execute("BEGIN")
    apply(db, ops)
    db.execute("COMMIT")
    rows = db.execute(
        "SELECT serial, phone, state, reason, attempts FROM sms ORDER BY rowid"
    ).fetchall()
    window = db.execute("SELECT phone FROM sms_window ORDER BY rowid").fetchall()
    return rows, window, [(op.serial, op.result, op.inserted) for op in ops]


def _one_by_one(db: sqlite3.Connection, ops: list[_Enqueue]) -> None:
    for op in ops:
        OutboxStore._apply_enqueue(db, op)


def test_a_batch_of_new_rows_ends_as_one_by_one_would() -> None:
    batch = _outcome(OutboxStore._apply_enqueues)
    assert batch == _outcome(_one_by_one)
    rows, _, answers = batch
    states = {serial: state for serial, _, state, _, _ in rows}
    assert [states[f"S-{n}"] for n in range(1, 9)] == [
        QUEUED,
        SUPPRESSED,
        SKIPPED,
        AMBIGUOUS,
        QUEUED,
        QUEUED,
        SUPPRESSED,
        QUEUED,
    ]
    assert ("S-1", QUEUED, False) in answers  # the second op of S-1: no new row
    assert ("S-OLD", "sent", False) in answers
    assert {phone for serial, phone, *_ in rows if serial in ("S-2", "S-3")} == {
        "138****5678",
        "****",
    }
