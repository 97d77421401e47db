"""The run's scratch index (dedupe ranking, the dry-run's plan): nothing left behind.

SQLite's anonymous temporary database (file name ``""``) lives in memory
until it outgrows its page cache, then spills to a file that SQLite creates
in ``$SQLITE_TMPDIR``/``$TMPDIR`` and unlinks the moment it is open: a
finished run, a crash and a kill -9 alike leave no file in DIR or ``/tmp``.
"""

from __future__ import annotations

import sqlite3


def scratch_db() -> sqlite3.Connection:
    """A private, unnamed on-disk database; ``uri=True`` so ATTACH takes ``file:`` URIs."""
    db = sqlite3.connect("", check_same_thread=False, isolation_level=None, uri=True)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA temp_store=FILE")
    return db
