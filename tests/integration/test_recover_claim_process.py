"""The merge's claim process (a forked child that claims, reads and parses pending/):
kill -9 of either side, then a rerun: every order exactly once, no process and no file left.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.fakes import FakeCenter
from tests.support.harness import wait_for
from tests.support.recover_helpers import (
    Recover,
    files,
    kill_when,
    merge_args,
    record,
    recover,
    write_pending,
)

# More files than the socket between the two processes holds, so the child is still at
# work (blocked handing over claimed files) when a side is killed.
N = 3000


def _buffer(root: Path) -> set[str]:
    recs = [record(i, i + 1, text=_big_body(i)) for i in range(N)]
    write_pending(root, recs)
    return {r.dedupe_key for r in recs}


def _big_body(i: int) -> str:
    return orjson.dumps(
        {"channel_id": "douyin", "channel_order_id": str(i), "note": "n" * 800}
    ).decode()


def _live_processes() -> Iterator[tuple[int, int, bytes]]:
    """(pid, parent pid, command line) of every process that is not a zombie."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if state != "Z":
            yield int(entry), int(ppid), cmdline


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    return [child for child, ppid, _ in _live_processes() if ppid == pid]


def _merges_of(root: Path) -> list[int]:
    """Live processes (a merge, or its forked claim process) working on ``root``."""
    arg = str(root).encode() + b"\0"
    return [pid for pid, _, cmdline in _live_processes() if arg in cmdline]


async def _start(root: Path, center: FakeCenter) -> tuple[set[str], tuple[str, ...], Recover, int]:
    """A slow merge of N files started: (keys, its arguments, it, its pid)."""
    keys = _buffer(root)
    center.delay_s = 0.02
    args = merge_args(root, center.url, "--batch", "20", "--concurrency", "2")
    proc = await Recover(*args).start()
    assert proc.proc is not None
    return keys, args, proc, proc.proc.pid


def _assert_once(root: Path, center: FakeCenter, keys: set[str]) -> None:
    assert center.duplicates() == {}
    assert set(center.creates) == keys
    assert files(root, "pending") == [] and files(root, "rejected") == []
    assert len(files(root, "merged")) == N


async def test_kill_9_of_the_merge_while_its_claim_process_works_then_rerun(
    center: FakeCenter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "buf"
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    keys, args, proc, merge_pid = await _start(root, center)
    claimers: list[int] = []

    def working() -> bool:
        claimers[:] = _children(merge_pid)
        return len(center.received) >= 40 and bool(claimers)

    await kill_when(proc, working, signal.SIGKILL, "the claim process at work, orders sent")
    run = await proc.finish(timeout=30)
    assert run.code == -signal.SIGKILL, run.err
    assert claimers, "no claim process was seen"
    # The claim process notices the merge is gone and ends: nothing keeps DIR locked.
    await wait_for(lambda: not _merges_of(root), 10, "the claim process to end")
    assert 0 < len(files(root, "merged")) < N  # killed midway: the rerun has work to do
    center.delay_s = 0
    run = await recover(*args)
    assert run.code == 0, run.err
    _assert_once(root, center, keys)
    assert os.listdir(scratch) == []
    assert not _merges_of(root)
    assert [n for n in os.listdir(root) if n.startswith(".")] == []


async def test_kill_9_of_the_claim_process_stops_the_merge_cleanly_then_rerun(
    center: FakeCenter, tmp_path: Path
) -> None:
    root = tmp_path / "buf"
    keys, args, proc, merge_pid = await _start(root, center)
    await wait_for(
        lambda: len(center.received) >= 40 and bool(_children(merge_pid)),
        30,
        "the claim process at work, orders sent",
        interval=0.005,
    )
    for pid in _children(merge_pid):
        os.kill(pid, signal.SIGKILL)
    run = await proc.finish(timeout=30)
    assert run.code == 1, run.err
    assert "the claim process" in run.err and "run again to resume" in run.err
    assert "Traceback" not in run.err
    # Orders sent before are settled; none left half-moved, nothing created twice.
    assert center.duplicates() == {}
    assert len(files(root, "pending")) + len(files(root, "merged")) == N
    assert not _merges_of(root)
    center.delay_s = 0
    run = await recover(*args)
    assert run.code == 0, run.err
    _assert_once(root, center, keys)
