"""Dedupe inside the directory as the merge streams: the first file of each key wins.

Files are met in a fixed order (loose files are known up front; pending/ in
name = serial order, ``recovery.listing``; then loose record files by serial,
then loose raw objects), so "first met" is the winner of
``recovery.source.rank_key`` -- the rule the dry-run's full plan applies too. The keys met
so far live in the run's scratch database (``recovery.scratch``),
so memory stays flat for a million files; the checkpoint is attached
read-only as ``ck`` for what earlier runs confirmed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.state.rows import insert_rows
from recovery.checkpoint import load_id
from recovery.item import Item
from recovery.scratch import scratch_db

SCHEMA = """
CREATE TABLE loose (key TEXT PRIMARY KEY, serial TEXT NOT NULL, file TEXT NOT NULL)
    WITHOUT ROWID;
CREATE TABLE seen (key TEXT PRIMARY KEY, serial TEXT NOT NULL, file TEXT NOT NULL)
    WITHOUT ROWID;
CREATE TABLE losers (file TEXT, loose INTEGER, serial TEXT, key TEXT, winner TEXT);
"""


Entry = tuple[str, str, str]  # (dedupe key, serial, file relative to DIR)


@dataclass(frozen=True)
class Facts:
    """What the checkpoint knows of one serial and of one dedupe key."""

    own_outcome: str | None = None
    own_order_id: Any = None
    confirmed_serial: str | None = None  # the key was confirmed with this serial
    confirmed_order_id: Any = None
    confirmed_digest: bytes | None = None


class Ranker:
    """Owns the temporary database; used from one thread at a time, in file order."""

    def __init__(self, checkpoint_path: Path) -> None:
        self._db = scratch_db()
        self._db.executescript(SCHEMA)
        self._db.execute("ATTACH ? AS ck", (f"file:{checkpoint_path}?mode=ro",))

    def close(self) -> None:
        self._db.close()

    def add_loose(self, items: Sequence[Entry]) -> None:
        """Loose record files (never raw objects), read before pending/: the first
        (serial, file) of each key."""
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO loose VALUES (?1, ?2, ?3) ON CONFLICT(key) DO UPDATE "
            "SET serial = ?2, file = ?3 WHERE (?2, ?3) < (serial, file)",
            items,
        )
        self._db.execute("COMMIT")

    def rank(self, items: Sequence[Entry], pending: bool) -> list[tuple[str, bool]]:
        """The winning serial of each (key, serial, file), in the order given; an item
        wins when its own (serial, file) is the winner's.

        ``pending``: the items come from pending/, whose keys a loose file with a
        lower serial takes first. Loose items come after pending/, by serial.
        """
        keys = list({k for k, _, _ in items})
        known = {
            k: (s, f)
            for k, s, f in self._in("SELECT key, serial, file FROM seen WHERE key IN ({})", keys)
        }
        loose = (
            {
                k: (s, f)
                for k, s, f in self._in(
                    "SELECT key, serial, file FROM loose WHERE key IN ({})", keys
                )
            }
            if pending
            else {}
        )
        out: list[tuple[str, bool]] = []
        new: list[Entry] = []
        for key, serial, file in items:
            winner = known.get(key)
            if winner is None:
                first_loose = loose.get(key)
                winner = (
                    first_loose
                    if first_loose is not None and first_loose[0] < serial
                    else (serial, file)
                )
                known[key] = winner
                new.append((key, *winner))
            out.append((winner[0], winner == (serial, file)))
        if new:
            self._db.execute("BEGIN")
            insert_rows(self._db, "INSERT INTO seen VALUES", 3, new)
            self._db.execute("COMMIT")
        return out

    def defer(self, losers: Sequence[Item]) -> None:
        """Losers whose winner is on its way: settled in the losers' pass."""
        if losers:
            self._db.execute("BEGIN")
            insert_rows(
                self._db,
                "INSERT INTO losers VALUES",
                5,
                [(x.file, int(x.loose), x.serial, x.key, x.winner) for x in losers],
            )
            self._db.execute("COMMIT")

    def losers(self, chunk: int = 256) -> Iterator[list[Item]]:
        """Deferred losers, in the order met, a chunk per query: no statement stays open
        (it would hold one snapshot of the checkpoint while ``facts`` reads it)."""
        last = 0
        while rows := self._db.execute(
            "SELECT rowid, file, loose, serial, key, winner FROM losers WHERE rowid > ? "
            "ORDER BY rowid LIMIT ?",
            (last, chunk),
        ).fetchall():
            last = rows[-1][0]
            yield [Item(f, bool(lo), s, k, w, wins=False) for _, f, lo, s, k, w in rows]

    def facts(
        self, serials: Sequence[str], keys: Sequence[str]
    ) -> tuple[dict[str, Facts], dict[str, Facts]]:
        """Checkpoint facts by serial and by key (two queries for a whole chunk)."""
        by_serial = {
            s: Facts(own_outcome=o, own_order_id=load_id(i))
            for s, o, i in self._in(
                "SELECT serial, outcome, order_id FROM ck.results WHERE serial IN ({})",
                list(set(serials)),
            )
        }
        by_key = {
            k: Facts(confirmed_serial=s, confirmed_order_id=load_id(i), confirmed_digest=d)
            for k, s, i, d in self._in(
                "SELECT key, serial, order_id, digest FROM ck.keys WHERE key IN ({})",
                list(set(keys)),
            )
        }
        return by_serial, by_key

    def _in(self, sql: str, values: list[str]) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for start in range(0, len(values), 500):
            part = values[start : start + 500]
            out.extend(self._db.execute(sql.format(",".join("?" * len(part))), part))
        return out
