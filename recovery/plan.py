"""The dry-run's plan: every order file of DIR indexed on disk, grouped by dedupe key.

A scan writes one row per file into the run's scratch database
(``recovery.scratch``); a window over the rows ranks each dedupe-key group
as the merge does (``recovery.source.rank_key``: record files before raw
objects, then by serial), however the directory lists. Rows
are then read back in chunks, joined with the checkpoint, so memory stays
flat for a directory of a million files.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from recovery.checkpoint import SCHEMA as CK_SCHEMA
from recovery.scratch import scratch_db
from recovery.source import Found

SCHEMA = """
CREATE TABLE scan (file TEXT, loose INTEGER, serial TEXT, key TEXT, digest BLOB, error TEXT,
                   unreadable INTEGER, raw INTEGER);
"""

PLAN = """
CREATE TABLE plan AS SELECT rowid AS id, file, loose, serial, key, digest, error, unreadable,
    ROW_NUMBER() OVER w AS rn, FIRST_VALUE(serial) OVER w AS winner
FROM scan WINDOW w AS (PARTITION BY coalesce(key, char(0) || file)
                       ORDER BY raw, serial, loose, file);
CREATE INDEX plan_id ON plan(id);
CREATE INDEX plan_key ON plan(key, rn);
"""


@dataclass(frozen=True)
class PlanStats:
    files: int
    corrupt: int  # every file that is no usable order, unreadable ones included
    unreadable: int
    keys: int
    duplicate_groups: int
    losers: int


class Plan:
    """Owns the temporary index database; the checkpoint is attached read-only as ``ck``."""

    def __init__(self, checkpoint_path: Path, live: bool) -> None:
        """``live``: the merge writes the checkpoint meanwhile and every query sees it;
        otherwise (dry-run) it is read as an immutable snapshot, or absent."""
        self._db = scratch_db()
        if live:
            self._db.execute("ATTACH ? AS ck", (f"file:{checkpoint_path}?mode=ro",))
        elif checkpoint_path.exists():
            # immutable: never create -shm/-wal files in DIR (dry-run changes nothing).
            self._db.execute("ATTACH ? AS ck", (f"file:{checkpoint_path}?mode=ro&immutable=1",))
        else:
            self._db.execute("ATTACH ':memory:' AS ck")
            self._db.executescript(CK_SCHEMA.replace("TABLE IF NOT EXISTS ", "TABLE ck."))
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def build(self, found: Iterator[Found]) -> PlanStats:
        while chunk := list(itertools.islice(found, 2000)):
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO scan VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        f.file,
                        int(f.loose),
                        f.serial,
                        f.key,
                        f.digest,
                        f.error,
                        int(f.unreadable),
                        int(f.raw),
                    )
                    for f in chunk
                ],
            )
            self._db.execute("COMMIT")
        self._db.executescript(PLAN)
        files, corrupt, unreadable, keys, losers = self._db.execute(
            "SELECT count(*), count(error), coalesce(sum(unreadable), 0), count(DISTINCT key), "
            "coalesce(sum(rn > 1), 0) FROM plan"
        ).fetchone()
        groups = self._db.execute("SELECT count(*) FROM plan WHERE rn = 2").fetchone()[0]
        return PlanStats(files, corrupt, unreadable, keys, groups, losers)

    def conflicts(self) -> int:
        """Losers whose body differs from their group's winner."""
        return int(
            self._db.execute(
                "SELECT count(*) FROM plan p JOIN plan w ON w.key = p.key AND w.rn = 1 "
                "WHERE p.rn > 1 AND p.digest IS NOT w.digest"
            ).fetchone()[0]
        )

    def confirmed_before(self) -> int:
        """Files whose dedupe key the checkpoint already saw confirmed."""
        return int(
            self._db.execute(
                "SELECT count(*) FROM plan p JOIN ck.keys k ON k.key = p.key"
            ).fetchone()[0]
        )

    def to_send(self) -> int:
        """Group winners with a key the center has not confirmed yet."""
        return int(
            self._db.execute(
                "SELECT count(*) FROM plan p LEFT JOIN ck.keys k ON k.key = p.key "
                "WHERE p.rn = 1 AND p.error IS NULL AND k.key IS NULL"
            ).fetchone()[0]
        )

    def duplicate_groups(self) -> Iterator[tuple[str, list[str], bool]]:
        """(key, serials winner first, same body?) for every key held by more than one file."""
        cur = self._db.execute(
            "SELECT key, group_concat(serial, char(10)), count(DISTINCT digest) FROM "
            "(SELECT key, serial, digest FROM plan WHERE key IN "
            " (SELECT key FROM plan WHERE rn = 2) ORDER BY key, rn) GROUP BY key"
        )
        while chunk := cur.fetchmany(500):
            for key, serials, digests in chunk:
                yield key, serials.split("\n"), digests == 1

    def problems(self) -> Iterator[dict[str, str]]:
        """Every file that is no usable order, by name: what merge would move aside
        (``corrupt``) or leave where it is (``unreadable``)."""
        cur = self._db.execute(
            "SELECT file, error, unreadable FROM plan WHERE error IS NOT NULL ORDER BY file"
        )
        while chunk := cur.fetchmany(500):
            for file, error, unreadable in chunk:
                yield {
                    "file": file,
                    "problem": "unreadable" if unreadable else "corrupt",
                    "error": error,
                }
