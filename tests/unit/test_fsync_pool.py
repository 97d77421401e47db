"""The pending batch's fsync pool: every fd synced, each failure reported for its file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from agent.base.fsync_pool import FsyncPool
from agent.errors import PersistError
from agent.spool.files import write_pending_batch
from agent.spool.record import BufferDirs, PendingRecord


def record(n: int) -> PendingRecord:
    return PendingRecord(
        f"WH-TEST-01-20261203-{n:09d}",
        "wh-test-01",
        "2026-12-03T10:00:00.000+08:00",
        "douyin",
        f"douyin:{n}",
        None,
        '{"channel_id":"douyin"}',
    )


def test_every_fd_is_synced_and_a_bad_one_is_reported_alone(tmp_path: Path) -> None:
    paths = [tmp_path / f"f{i}" for i in range(40)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT, 0o600) for p in paths]
    os.close(fds[7])  # fd 7 is now bad: its fsync fails with EBADF
    try:
        with FsyncPool(4) as pool:
            errors = pool.sync_all(fds)
            assert pool.sync_all([]) == []
    finally:
        for i, fd in enumerate(fds):
            if i != 7:
                os.close(fd)
    assert isinstance(errors[7], OSError) and errors[7].errno == errno.EBADF
    assert [e for i, e in enumerate(errors) if i != 7] == [None] * 39


class FailingFirst(FsyncPool):
    """The disk fails the first file's fsync (EIO); the others sync."""

    def sync_all(self, fds: list[int]) -> list[Exception | None]:
        errors = super().sync_all(fds)
        errors[0] = OSError(errno.EIO, "Input/output error")
        return errors


def test_a_file_whose_fsync_failed_is_not_acknowledged_nor_left_behind(tmp_path: Path) -> None:
    dirs = BufferDirs(tmp_path / "spool")
    dirs.ensure()
    failed, fine = record(1), record(2)
    with FailingFirst(2) as pool:
        results = write_pending_batch(dirs, [failed, fine], pool)
    assert isinstance(results[0], PersistError)
    assert f"pending/{failed.filename}" in str(results[0])
    assert results[1] is None
    # Never renamed into pending/ (not durable), its temp file gone; the other one stays.
    assert sorted(os.listdir(dirs.pending)) == [fine.filename]
