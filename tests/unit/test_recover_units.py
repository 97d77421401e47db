"""Small pieces of edge-recover that the end-to-end tests reach only by chance."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.spool.record import BufferDirs
from recovery.checkpoint import Checkpoint, ResultRow
from recovery.finisher import NOTE, Finisher, Settled
from recovery.progress import Progress


async def test_finisher_hands_on_more_orders_than_it_has_room_for(tmp_path: Path):
    """put() of a list longer than the room must not wait for a flush it never asked for."""
    settled: list[str] = []
    checkpoint = Checkpoint(tmp_path / "ck.db", run=1)
    finisher = Finisher(
        BufferDirs(tmp_path),
        checkpoint,
        lambda items: settled.extend(i.row.serial for i in items),
        limit=3,
    )
    finisher.start()
    items = [Settled(ResultRow(f"S{i}", f"k:{i}", f"f{i}", "pending"), NOTE) for i in range(20)]
    await asyncio.wait_for(finisher.put(items), 10)
    await asyncio.wait_for(finisher.stop(), 10)
    assert sorted(settled) == sorted(f"S{i}" for i in range(20))
    assert checkpoint.counts() == {"pending": 20}
    checkpoint.close()


def test_progress_logs_one_line_per_tenth(caplog):
    caplog.set_level("INFO", logger="recovery")
    progress = Progress(1000, "merge", tty=False)
    for _ in range(100):
        progress.update(10)
    progress.update(0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("merge: 10% (100/1000)") and "ETA" in lines[0]
    assert lines[-1].startswith("merge: 100% (1000/1000)")


def test_progress_on_a_terminal_is_a_rich_bar_not_log_lines(caplog, capsys):
    caplog.set_level("INFO", logger="recovery")
    progress = Progress(200, "merge", tty=True)
    for _ in range(20):
        progress.update(10)
    progress.close()
    err = capsys.readouterr().err
    assert "merge" in err and "200/200" in err and "orders/s" in err
    assert not caplog.records  # the bar replaces the per-10% lines


async def test_finisher_never_holds_more_unsettled_orders_than_its_room(tmp_path: Path):
    """The room bounds the open claims: concurrent put()s wait, none overfills it."""
    checkpoint = Checkpoint(tmp_path / "ck.db", run=1)
    groups: list[int] = []
    write = checkpoint.write
    checkpoint.write = lambda rows: (groups.append(len(rows := list(rows))), write(rows))[1]  # type: ignore[method-assign]
    finisher = Finisher(BufferDirs(tmp_path), checkpoint, lambda items: None, limit=3)
    finisher.start()
    puts = [
        finisher.put(
            [Settled(ResultRow(f"S{p}-{i}", None, "f", "pending"), NOTE) for i in range(20)]
        )
        for p in range(4)
    ]
    await asyncio.wait_for(asyncio.gather(*puts), 10)
    await asyncio.wait_for(finisher.stop(), 10)
    assert sum(groups) == 80 and max(groups) <= 3
    assert checkpoint.counts() == {"pending": 80}
    checkpoint.close()
