"""Multi-row inserts (agent.state.rows) leave the table exactly as executemany would."""

from __future__ import annotations

import sqlite3

from agent.state.rows import ROWS_PER_STATEMENT, insert_rows

SCHEMA = "CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER, note TEXT)"


def _table(write) -> list[tuple[object, ...]]:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute(SCHEMA)
    db.execute("BEGIN")
    write(db)
    db.execute("COMMIT")
    return db.execute("SELECT rowid, k, v, note FROM t ORDER BY rowid").fetchall()


def test_same_rows_same_order_as_executemany_across_statements():
    # More rows than one statement holds, repeated keys inside and across statements.
    rows = [(f"k{i % 150}", i, None if i % 3 else "x") for i in range(2 * ROWS_PER_STATEMENT + 7)]
    for head in ("INSERT OR REPLACE INTO t VALUES", "INSERT OR IGNORE INTO t VALUES"):
        many = _table(lambda db, h=head: db.executemany(f"{h} (?,?,?)", rows))
        multi = _table(lambda db, h=head: insert_rows(db, h, 3, rows))
        assert multi == many and len(multi) == 150, head


def test_no_rows_no_statement():
    assert _table(lambda db: insert_rows(db, "INSERT INTO t VALUES", 3, [])) == []
