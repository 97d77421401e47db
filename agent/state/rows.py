"""Rows into SQLite many at a time: one statement, one step, for up to a hundred rows.

``executemany`` steps its statement once per row, and Python's sqlite3 lets go of
the GIL around every step: each step is a hand-over to whichever thread waits for
the GIL (the agent's event loop beside its SQLite threads, the merge's threads
beside each other; measured: futex calls, a large part of their system time). One
multi-row ``INSERT ... VALUES (...),(...)`` inserts the same rows in the same
order, each as its own row would (a later row replaces or is ignored beside an
earlier one exactly as with ``executemany``), at a third less CPU.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

ROWS_PER_STATEMENT = 100  # 100 x 9 columns: far below SQLite's 32,766 parameters


def insert_rows(
    db: sqlite3.Connection, head: str, width: int, rows: Sequence[Sequence[Any]]
) -> None:
    """``head`` ("INSERT [OR ...] INTO t VALUES") for each of ``rows`` (``width`` values
    each), in order, inside the caller's transaction."""
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        part = rows[start : start + ROWS_PER_STATEMENT]
        db.execute(f"{head} {','.join([one] * len(part))}", [v for row in part for v in row])
