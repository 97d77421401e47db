"""Serials never repeat; retention forgets only what is delivered."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from agent.spool.housekeeping import Housekeeper
from agent.spool.record import BufferDirs
from agent.state.journal import BUFFERED, FORWARDED, MERGED, Entry, Journal
from agent.state.serials import SerialIssuer, parse_counter


async def test_serials_are_sortable_and_continue_after_restart(tmp_path: Path):
    journal = Journal(str(tmp_path))
    await journal.start()
    issuer = SerialIssuer(journal, "wh-sh-01", tmp_path, block=10)
    first = [await issuer.next() for _ in range(15)]
    await journal.stop()
    assert first == sorted(first) and len(set(first)) == 15
    assert first[0].startswith("WH-SH-01-") and first[0].endswith("-000000001")

    # A restart (or kill -9) skips the rest of the reserved block, never repeats.
    journal = Journal(str(tmp_path))
    await journal.start()
    issuer = SerialIssuer(journal, "wh-sh-01", tmp_path, block=10)
    after = await issuer.next()
    await journal.stop()
    assert parse_counter(after, "WH-SH-01") == 21
    assert after not in first


async def test_serial_floor_from_disk_wins_over_a_reset_database(tmp_path: Path):
    journal = Journal(str(tmp_path / "fresh"))
    await journal.start()
    issuer = SerialIssuer(journal, "wh-sh-01", tmp_path)
    issuer.raise_floor(4711)
    serial = await issuer.next()
    await journal.stop()
    assert parse_counter(serial, "WH-SH-01") == 4712
    assert parse_counter(serial, "OTHER") is None


async def test_serials_never_repeat_after_the_state_directory_is_lost(tmp_path: Path):
    """Forwarded orders leave no file; the high-water file beside the buffer remembers."""
    spool = tmp_path / "spool"
    spool.mkdir()
    journal = Journal(str(tmp_path / "state"))
    await journal.start()
    issuer = SerialIssuer(journal, "wh-sh-01", spool, block=10)
    await issuer.start()
    first = [await issuer.next() for _ in range(12)]
    await journal.stop()
    backup = tmp_path / "backup"
    shutil.copytree(tmp_path / "state", backup)
    journal = Journal(str(tmp_path / "state"))
    await journal.start()
    issuer = SerialIssuer(journal, "wh-sh-01", spool, block=10)
    await issuer.start()
    first += [await issuer.next() for _ in range(25)]  # the backup is now old
    await journal.stop()

    for lost in ("deleted", "restored from an old backup"):
        shutil.rmtree(tmp_path / "state")
        if lost != "deleted":
            shutil.copytree(backup, tmp_path / "state")
        journal = Journal(str(tmp_path / "state"))
        await journal.start()
        issuer = SerialIssuer(journal, "wh-sh-01", spool, block=10)
        await issuer.start()
        again = [await issuer.next() for _ in range(3)]
        await journal.stop()
        assert not set(again) & set(first), lost
        first += again


async def test_retention_prunes_delivered_rows_and_old_merged_files(tmp_path: Path):
    journal = Journal(str(tmp_path / "state"))
    await journal.start()
    for key, state in (
        ("k:old-fwd", FORWARDED),
        ("k:old-merged", MERGED),
        ("k:old-buffered", BUFFERED),
    ):
        await journal.record(Entry(key, f"S-{key}", state, None, None, b"d", "2026-01-01"))
    dirs = BufferDirs(tmp_path / "spool")
    dirs.ensure()
    old, new = dirs.merged / "OLD.json", dirs.merged / "NEW.json"
    old.write_text("{}")
    new.write_text("{}")
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))

    keeper = Housekeeper(journal, dirs, journal_retention_days=0, merged_retention_days=7)
    await keeper.run_once()
    assert await journal.by_key("k:old-fwd") is None
    assert await journal.by_key("k:old-merged") is None
    kept = await journal.by_key("k:old-buffered")
    assert kept is not None and kept.state == BUFFERED  # never forgotten while undelivered
    assert sorted(os.listdir(dirs.merged)) == ["NEW.json"]
    await journal.stop()


async def test_a_row_committed_behind_the_reply_is_seen_at_once_and_held_from_the_drain(
    tmp_path: Path,
):
    """record_behind (a buffered order's row, behind its 202): lookups see it before the
    commit, so a retry is a duplicate; queued() keeps the drain off the file until the
    row is durable; afterwards the row comes from the database itself."""
    journal = Journal(str(tmp_path))
    await journal.start()
    entry = Entry(
        "douyin:behind-1",
        "WH-SH-01-20261130-000000001",
        BUFFERED,
        None,
        None,
        b"d" * 32,
        "2026-11-30T10:00:00.000+08:00",
    )
    journal.record_behind(entry)
    assert journal.queued(entry.serial)
    assert await journal.by_key(entry.dedupe_key) == entry
    assert await journal.by_serial(entry.serial) == entry
    # A later row commits after it (one writer, in order): then it is durable.
    await journal.record(
        Entry(
            "douyin:behind-2",
            "WH-SH-01-20261130-000000002",
            FORWARDED,
            "primary",
            "OC1",
            b"e" * 32,
            "2026-11-30T10:00:00.000+08:00",
        )
    )
    assert not journal.queued(entry.serial)
    await journal.stop()

    journal = Journal(str(tmp_path))  # read back from disk, nothing in memory
    await journal.start()
    assert await journal.by_key(entry.dedupe_key) == entry
    await journal.stop()


async def test_a_failing_journal_read_says_which_file_and_is_ours_not_sqlite3s(tmp_path: Path):
    """Reads translate SQLite's errors where the library is called: the intake's 503 and the
    log name the journal file instead of a bare sqlite3 error (or a 500)."""
    import sqlite3

    import pytest

    from agent.errors import PersistError

    journal = Journal(str(tmp_path))
    await journal.start()
    try:
        with sqlite3.connect(tmp_path / "journal.sqlite3") as other:  # the damage
            other.execute("DROP TABLE orders")
        for read in (
            journal.by_key("douyin:1"),
            journal.by_serial("S-1"),
            journal.pinned_counts(),
            journal.pending_summary(),
        ):
            with pytest.raises(PersistError, match=r"journal read failed in .*journal\.sqlite3"):
                await read
    finally:
        await journal.stop()
