"""Opening a state database the way every store here needs it, and committing to it.

One writer connection (WAL, the caller's synchronous level) and one reader
(WAL lets it read while the writer commits), both owned by a ``SqliteDb``
whose ``open()``/``close()`` the store calls from its own start/stop.

A damaged database never stops the agent: the journal and the outbox are
indexes of what the buffer files say. A file SQLite cannot read is moved
aside (never deleted) to ``{name}.damaged-{timestamp}``, logged loudly, and a
new one is created; ``rebuilt`` tells the store to be careful about what it
can no longer know (the outbox marks such notices ambiguous, never resends).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from agent.errors import PersistError

log = logging.getLogger("agent.state")
T = TypeVar("T")


class SqliteDb:
    def __init__(
        self,
        path: Path,
        what: str,
        schema: str,
        synchronous: str,
        isolation_level: str | None = None,
    ) -> None:
        self.path = path
        self._what = what
        self._schema = schema
        self._synchronous = synchronous
        self._isolation = isolation_level
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self.rebuilt: Path | None = None  # where the damaged file was moved, if it was

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RuntimeError(f"the {self._what} database is not open: call start() first")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError(f"the {self._what} database is not open: call start() first")
        return self._reader

    async def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            await self._connect()
        except _Damaged as exc:
            await self.close()
            self.rebuilt = self._move_aside()
            log.error(
                "the %s database %s is damaged (%s); moved it to %s and started a new "
                "one, rebuilt from the buffer files: keep the damaged copy for analysis",
                self._what,
                self.path,
                exc.reason,
                self.rebuilt,
                extra={"database": str(self.path), "moved_to": str(self.rebuilt)},
            )
            try:
                await self._connect()
            except _Damaged as again:
                await self.close()
                raise PersistError(
                    f"cannot create a new {self._what} database at {self.path}: {again.reason}"
                ) from again
        self.path.chmod(0o600)

    async def _connect(self) -> None:
        try:
            self._writer = await aiosqlite.connect(self.path, isolation_level=self._isolation)
            await self._writer.execute("PRAGMA busy_timeout=5000")
            await self._writer.execute("PRAGMA journal_mode=WAL")
            await self._writer.execute(f"PRAGMA synchronous={self._synchronous}")
            rows = list(await self._writer.execute_fetchall("PRAGMA quick_check"))
            if not rows or rows[0][0] != "ok":
                raise _Damaged(f"quick_check says {rows[0][0] if rows else 'nothing'}")
            await self._writer.executescript(self._schema)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA busy_timeout=5000")
            # For point reads on the event loop's own thread (see ``read_inline``): never
            # waits for a lock (busy_timeout 0); a busy read falls back to ``reader``.
            self._inline = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._inline.execute("PRAGMA busy_timeout=0")
        except sqlite3.OperationalError as exc:  # locked, unreadable, no space: not damage
            await self.close()
            raise PersistError(
                f"cannot open the {self._what} database {self.path}: {exc}; check agent.state_dir"
            ) from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
            raise _Damaged(str(exc)) from exc

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, f"{aside}{suffix}")
        return aside

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of one read on the reader; errors become PersistError naming the file."""
        try:
            return list(await self.reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise PersistError(f"{self._what} read failed in {self.path}: {exc}") from exc

    async def read_inline(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """All rows of one small read (a primary-key lookup), without a thread hop.

        In WAL mode a reader never waits for the writer, so a point read from the
        page cache costs a few microseconds on the loop's thread, where a hop to the
        reader's thread costs a thread wake-up and a loop callback each way. Should
        SQLite answer "busy" (a WAL recovery by another connection), or the inline
        connection be unavailable, the read goes to the reader thread as before.
        """
        if self._inline is not None:
            try:
                return self._inline.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                pass  # busy: the reader thread waits its turn
            except sqlite3.Error as exc:
                raise PersistError(f"{self._what} read failed in {self.path}: {exc}") from exc
        return await self.read(sql, params)

    async def close(self) -> None:
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._writer = self._reader = None

    async def in_transaction(
        self, fn: Callable[[sqlite3.Connection], T], synchronous: str | None = None
    ) -> T:
        """Run ``fn(connection)`` in one write transaction, all of it on the writer's thread.

        The same BEGIN IMMEDIATE ... COMMIT (at the same ``synchronous`` level) as
        ``transaction()``, in one hop to the SQLite thread instead of one per statement:
        on the hot path each hop is a thread wake-up and a loop callback.
        """
        db = self.writer
        try:
            result: T = await db._execute(  # type: ignore[no-untyped-call]
                self._run_in_tx, db._conn, fn, synchronous
            )
        except sqlite3.Error as exc:
            raise PersistError(f"{self._what} write failed in {self.path}: {exc}") from exc
        return result

    def _run_in_tx(
        self,
        conn: sqlite3.Connection,
        fn: Callable[[sqlite3.Connection], T],
        synchronous: str | None,
    ) -> T:
        switch = synchronous is not None and synchronous != self._synchronous
        try:
            if switch:
                conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result
        finally:
            if switch:
                conn.execute(f"PRAGMA synchronous={self._synchronous}")


class _Damaged(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
