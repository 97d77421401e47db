"""Opening a state database the way every store here needs it.

One writer connection (WAL, the caller's synchronous level) and one reader
(WAL lets it read while the writer commits), both owned by a ``SqliteDb``
whose ``open()``/``close()`` the store calls from its own start/stop.
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from agent.errors import PersistError


class SqliteDb:
    def __init__(self, path: Path, what: str, schema: str, synchronous: str,
                 isolation_level: str | None = None) -> None:
        self.path = path
        self._what = what
        self._schema = schema
        self._synchronous = synchronous
        self._isolation = isolation_level
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None

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
            self._writer = await aiosqlite.connect(self.path, isolation_level=self._isolation)
            await self._writer.execute("PRAGMA journal_mode=WAL")
            await self._writer.execute(f"PRAGMA synchronous={self._synchronous}")
            await self._writer.execute("PRAGMA busy_timeout=5000")
            await self._writer.executescript(self._schema)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA busy_timeout=5000")
        except Exception as exc:
            await self.close()
            raise PersistError(f"cannot open the {self._what} database {self.path}: {exc}; "
                               "check agent.state_dir") from exc
        self.path.chmod(0o600)

    async def close(self) -> None:
        for db in (self._reader, self._writer):
            if db is not None:
                await db.close()
        self._writer = self._reader = None
