"""Ctrl-C stops edge-recover at once (issue 21.1): nothing more is sent after the signal.

The defect: with ``--rate``, batches already taken from the queue were paced out after the
first SIGINT (3,200 more orders reached the center after a Ctrl-C at 400 of 4,000), and a
second Ctrl-C printed a KeyboardInterrupt traceback. Real subprocess, real signals, a center
that counts what reaches it.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.support.fakes import FakeCenter
from tests.support.harness import wait_for
from tests.support.recover_helpers import Recover, files, merge_args, record, recover, write_pending

N = 400


async def _interrupt_at(proc: Recover, center: FakeCenter, n: int) -> int:
    await wait_for(lambda: len(center.received) >= n, 30, f"{n} orders at the center", 0.002)
    proc.signal(signal.SIGINT)
    return len(center.received)


async def test_one_sigint_sends_nothing_more_and_the_rerun_finishes(
    center: FakeCenter, tmp_path: Path
) -> None:
    root = tmp_path / "buf"
    write_pending(root, [record(i, i) for i in range(N)])
    # 50 orders/s in batches of 10 (5 requests/s): minutes of paced batches are queued
    # behind the workers when the signal comes.
    args = merge_args(root, center.url, "--rate", "50", "--batch", "10", "--concurrency", "8")
    proc = await Recover(*args).start()
    at_signal = await _interrupt_at(proc, center, 40)
    run = await proc.finish(timeout=30)
    after = len(center.received) - at_signal
    assert run.code == 1, run.err
    assert "interrupted" in run.err and "Traceback" not in run.err
    # At most what was already on the wire: one paced batch of 10 (the center answers in
    # microseconds, the next batch is 200 ms away).
    assert after <= 10, f"{after} orders reached the center after the signal"
    assert len(files(root, "merged")) == len(center.creates)  # every answer settled
    run = await recover(*merge_args(root, center.url, "--batch", "10"))
    assert run.code == 0, run.err
    assert len(center.creates) == N and max(center.creates.values()) == 1
    assert len(files(root, "merged")) == N and files(root, "pending") == []


async def test_a_second_sigint_aborts_at_once_without_a_traceback(
    center: FakeCenter, tmp_path: Path
) -> None:
    root = tmp_path / "buf"
    write_pending(root, [record(i, i) for i in range(N)])
    center.delay_s = 2.0  # requests stay on the wire: the first signal has to wait for them
    args = merge_args(root, center.url, "--batch", "1", "--concurrency", "4")
    proc = await Recover(*args).start()
    await _interrupt_at(proc, center, 4)
    started = time.monotonic()
    await wait_for(lambda: "SIGINT" in proc.err_so_far(), 10, "the first signal taken")
    proc.signal(signal.SIGINT)
    run = await proc.finish(timeout=10)
    assert time.monotonic() - started < center.delay_s  # did not wait for the answers
    assert run.code == 1 and "aborted at once" in run.err, run.err
    assert "Traceback" not in run.err and "KeyboardInterrupt" not in run.err
    center.delay_s = 0
    run = await recover(*merge_args(root, center.url))
    assert run.code == 0, run.err
    assert len(center.creates) == N and max(center.creates.values()) == 1
