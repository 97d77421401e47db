"""The merge checkpoint: ``DIR/.edge-recover.db`` (sqlite, WAL), written as answers arrive;
kept while anything is left to resume, removed when a merge finishes with every file settled.

Files stay the truth for what is undelivered (DESIGN invariant 2): a file
leaves pending/ only after the center confirmed it. The checkpoint adds what
the files cannot say after a crash:

- ``results``: the last outcome per serial (created, duplicate, rejected,
  conflict, by_agent, pending, unreadable), for the report and for resume: a file whose
  serial is confirmed here is moved to merged/ without another request;
- ``keys``: dedupe keys the center confirmed, with the winning serial and a
  body digest, so a rerun reports a loser of a duplicate group as "duplicate"
  (or "conflict") instead of sending it.

Rows are appended in groups by the finisher, ahead of the file moves they
describe. One connection, used from one thread at a time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from agent.base.durable import fsync_dir
from agent.state.rows import insert_rows

CHECKPOINT_NAME = ".edge-recover.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    serial TEXT PRIMARY KEY, key TEXT, file TEXT, outcome TEXT NOT NULL,
    order_id TEXT, error TEXT, duplicate_of TEXT, run INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY, serial TEXT NOT NULL, order_id TEXT, digest BLOB);
"""

DELIVERED = ("created", "duplicate", "by_agent")
# A file we could not read (EACCES, EIO, a dangling link): left where it is, reported.
UNREADABLE = "unreadable"


class ResultRow(NamedTuple):
    """One order's outcome in this run (also one entry of the report). A tuple: one is
    made per order on the merge's busiest thread, where a frozen dataclass costs twice as much."""

    serial: str
    key: str | None
    file: str
    outcome: str
    order_id: Any = None
    error: str | None = None
    duplicate_of: str | None = None
    digest: bytes | None = None  # set for delivered winners: goes to ``keys``


def dump_id(order_id: Any) -> str | None:
    return None if order_id is None else orjson.dumps(order_id).decode()


def load_id(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


class Checkpoint:
    """Append-only, group-committed writer of ``results`` and ``keys``."""

    def __init__(self, path: Path, run: int) -> None:
        self.path = path
        self.run = run
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A SIGKILL loses nothing committed; an OS crash may lose the last
        # groups, which only costs a repeated (idempotent) request.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def discard(self) -> None:
        """Close and remove the checkpoint: the run finished with every file settled, so
        there is nothing to resume, and DIR is left as the agent would leave it. (The
        center's idempotency and merged/ answer any later rerun; the report is the record.)
        """
        self._db.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        fsync_dir(self.path.parent)

    def write(self, rows: Iterable[ResultRow]) -> None:
        now = time.time()
        rows = list(rows)
        if not rows:
            return
        self._db.execute("BEGIN")
        try:
            insert_rows(
                self._db,
                "INSERT OR REPLACE INTO results VALUES",
                9,
                [
                    (
                        r.serial,
                        r.key,
                        r.file,
                        r.outcome,
                        dump_id(r.order_id),
                        r.error,
                        r.duplicate_of,
                        self.run,
                        now,
                    )
                    for r in rows
                ],
            )
            insert_rows(
                self._db,
                "INSERT OR IGNORE INTO keys VALUES",
                4,
                [
                    (r.key, r.serial, dump_id(r.order_id), r.digest)
                    for r in rows
                    if r.key is not None and r.outcome in DELIVERED and r.duplicate_of is None
                ],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def counts(self, run: int | None = None) -> dict[str, int]:
        sql = "SELECT outcome, count(*) FROM results"
        args: tuple[int, ...] = ()
        if run is not None:
            sql += " WHERE run = ?"
            args = (run,)
        return dict(self._db.execute(sql + " GROUP BY outcome", args).fetchall())

    def entries(self, run: int) -> Iterable[dict[str, Any]]:
        """This run's rows, streamed (a million rows never sit in memory at once)."""
        cur = self._db.execute(
            "SELECT serial, key, file, outcome, order_id, error, duplicate_of FROM results "
            "WHERE run = ? ORDER BY rowid",
            (run,),
        )
        while chunk := cur.fetchmany(1000):
            for serial, key, file, outcome, order_id, error, dup in chunk:
                entry: dict[str, Any] = {
                    "serial": serial,
                    "dedupe_key": key,
                    "file": file,
                    "outcome": outcome,
                }
                if order_id is not None:
                    entry["order_id"] = load_id(order_id)
                if error is not None:
                    entry["error"] = error
                if dup is not None:
                    entry["duplicate_of"] = dup
                yield entry
