"""``edge-recover --mode chain`` (issue 20.1): the agent's chain checks over DIR/merged.

A real buffer merged by a real ``edge-recover --mode merge`` into a FakeCenter
(127.0.0.2), the TMS / invoicing / ERP trio of tests/chain_fakes.py (127.0.0.5), and
edge-recover as a real subprocess: each exit code of CONTRACT 10, a rerun that resumes
from the ledger in DIR, a mismatch printed and reported with both values.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from recovery.chain import LEDGER_FILE
from tests.support.chain_fakes import Downstream, chain_section
from tests.support.fakes import FakeCenter
from tests.support.harness import wait_for, write_config
from tests.support.recover_helpers import (
    Recover,
    body,
    files,
    merge_args,
    record,
    recover,
    report,
    write_pending,
)

N = 4


@pytest.fixture
async def downstream(center: FakeCenter) -> AsyncIterator[Downstream]:
    ds = await Downstream(center=center).start()
    yield ds
    await ds.stop()


async def merged_buffer(tmp_path: Path, center: FakeCenter, n: int = N) -> Path:
    """A buffer of ``n`` orders of 199.10, merged into the center for real."""
    root = tmp_path / "buf"
    write_pending(root, [record(i, i, text=body(i, total_amount="199.10")) for i in range(n)])
    run = await recover(*merge_args(root, center.url))
    assert run.code == 0, run.err
    assert len(files(root, "merged")) == n
    return root


def config(tmp_path: Path, center: FakeCenter, ds: Downstream, **chain: Any) -> str:
    section = chain_section(ds, **{"recheck_interval_s": 3600, **chain})
    return str(write_config(tmp_path, center.url, chain=section))


def chain_args(root: Path, cfg: str, *extra: str) -> tuple[str, ...]:
    return ("--path", str(root), "--mode", "chain", "--config", cfg, *extra)


def oid(center: FakeCenter, n: int) -> str:
    return center.orders[f"douyin:{n}"][0]


def states(doc: dict[str, Any], step: str) -> dict[str, str]:
    return {o["serial"]: o["steps"][step]["state"] for o in doc["orders"]}


async def test_pending_then_a_rerun_resumes_then_all_verified(
    tmp_path: Path, center: FakeCenter, downstream: Downstream
):
    root = await merged_buffer(tmp_path, center)
    cfg = config(tmp_path, center, downstream)
    out = tmp_path / "chain-report.json"

    # Run 1: no tracking yet (re-pushed now), no invoice yet (it lags): pending, exit 4.
    run = await recover(*chain_args(root, cfg, "--report", str(out)))
    assert run.code == 4, run.out + run.err
    assert "logistics: verified 0, pending 4" in run.out
    assert "finance: verified 4" in run.out
    assert {downstream.repush_calls[oid(center, i)] for i in range(N)} == {1}
    doc = report(out)
    assert doc["summary"]["mode"] == "chain" and doc["summary"]["total"] == N
    assert doc["summary"]["steps"]["invoice"]["pending"] == N
    assert set(states(doc, "invoice").values()) == {"pending"}
    assert set(states(doc, "finance").values()) == {"verified"}
    assert {o["steps"]["finance"]["detail"] for o in doc["orders"]} == {'/amount = "199.10"'}
    assert (root / LEDGER_FILE).is_file() and files(root) == []  # no *.json left in DIR

    # Run 2 resumes from the ledger in DIR: the re-pushed tracking is there now; only
    # what is outstanding is checked (4 tracks + 4 invoices, never finance again).
    requests = len(downstream.seen_auth)
    run = await recover(*chain_args(root, cfg))
    assert run.code == 4, run.out + run.err
    assert "logistics: verified 4" in run.out and "invoice: verified 0, pending 4" in run.out
    assert len(downstream.seen_auth) - requests == 2 * N

    # Run 3: the invoices are issued: every step verified, exit 0, 4 requests.
    downstream.invoice_all = True
    requests = len(downstream.seen_auth)
    run = await recover(*chain_args(root, cfg, "--report", str(out)))
    assert run.code == 0, run.out + run.err
    assert len(downstream.seen_auth) - requests == N
    doc = report(out)
    for step in ("logistics", "invoice", "finance"):
        assert set(states(doc, step).values()) == {"verified"}
    assert {downstream.repush_calls[oid(center, i)] for i in range(N)} == {1}


async def test_a_truncated_amount_is_failed_with_both_values_and_fixed_on_a_rerun(
    tmp_path: Path, center: FakeCenter, downstream: Downstream
):
    root = await merged_buffer(tmp_path, center)
    cfg = config(tmp_path, center, downstream)
    out = tmp_path / "r.json"
    downstream.repushed.update(oid(center, i) for i in range(N))
    downstream.invoice_all = True
    downstream.amount_override["2"] = "199"
    downstream.amount_override["3"] = "199.1"  # the same amount, other digits: fine
    run = await recover(*chain_args(root, cfg, "--report", str(out)))
    assert run.code == 1, run.out + run.err
    wrong = '/amount is "199" downstream, expected "199.10"'
    serial2 = record(2, 2).serial
    assert f"failed finance: {serial2} (order {oid(center, 2)}, douyin:2): {wrong}" in run.out
    doc = report(out)
    assert doc["summary"]["steps"]["finance"] == {
        "verified": 3,
        "pending": 0,
        "failed": 1,
        "overdue": 0,
    }
    assert [o["steps"]["finance"] for o in doc["orders"] if o["serial"] == serial2] == [
        {"state": "failed", "detail": wrong}
    ]
    assert downstream.repush_calls == {}  # a mismatch is never repaired
    # Someone corrects the posting: the rerun checks only the failed step, exit 0.
    del downstream.amount_override["2"]
    requests = len(downstream.seen_auth)
    run = await recover(*chain_args(root, cfg))
    assert run.code == 0, run.out + run.err
    assert len(downstream.seen_auth) - requests == 1
    assert "finance: verified 4, pending 0, failed 0, overdue 0" in run.out


async def test_a_repair_is_asked_once_per_interval_across_runs(
    tmp_path: Path, center: FakeCenter, downstream: Downstream
):
    root = await merged_buffer(tmp_path, center, 2)
    downstream.repush_works = False  # taken, but the tracking never appears
    downstream.invoice_all = True
    for interval, calls in ((3600, 1), (3600, 1), (0.001, 2)):
        cfg = config(tmp_path, center, downstream, recheck_interval_s=interval)
        run = await recover(*chain_args(root, cfg))
        assert run.code == 4, run.out + run.err
        assert {downstream.repush_calls[oid(center, i)] for i in range(2)} == {calls}


async def test_a_system_down_is_exit_3_and_overdue_is_exit_1(
    tmp_path: Path, center: FakeCenter, downstream: Downstream
):
    root = await merged_buffer(tmp_path, center, 2)
    downstream.repushed.update(oid(center, i) for i in range(2))
    downstream.invoice_all = True
    downstream.erp_status = 503
    cfg = config(tmp_path, center, downstream)
    run = await recover(*chain_args(root, cfg))
    assert run.code == 3, run.out + run.err
    assert "unreachable finance: 2 checks got no usable answer" in run.out
    assert "HTTP 503" in run.out
    assert "finance: verified 0, pending 2, failed 0, overdue 0" in run.out  # never failed
    # Past the deadline (0.0001 h from the merge), a step still pending is overdue.
    cfg = config(tmp_path, center, downstream, deadline_h=0.0001)
    run = await recover(*chain_args(root, cfg))
    assert run.code == 1, run.out + run.err
    assert "finance: verified 0, pending 0, failed 0, overdue 2" in run.out
    assert f"overdue finance: {record(0, 0).serial}" in run.out


async def test_usage_and_config_errors_are_exit_2_with_one_line(
    tmp_path: Path, center: FakeCenter, downstream: Downstream
):
    root = await merged_buffer(tmp_path, center, 1)
    (tmp_path / "bare").mkdir()
    bare = str(write_config(tmp_path / "bare", center.url))
    cases = [
        (chain_args(root, bare), "no [[chain.step]] configured"),
        (("--path", str(root), "--mode", "chain"), "--mode chain needs the [chain] steps"),
        (
            chain_args(root, config(tmp_path, center, downstream), "--target", center.url),
            "--target is not used by --mode chain",
        ),
        (chain_args(tmp_path / "nope", bare), "not a directory"),
    ]
    for args, message in cases:
        run = await recover(*args)
        assert run.code == 2, run.err
        assert run.err.count("\n") == 1 and message in run.err, run.err
        assert not (tmp_path / "nope").exists()
    assert not (root / LEDGER_FILE).exists()


async def test_ctrl_c_stops_taking_checks_and_a_second_aborts_at_once(
    tmp_path: Path, center: FakeCenter, downstream: Downstream
):
    root = await merged_buffer(tmp_path, center, 40)
    downstream.hang = True  # every check hangs until the 2 s timeout
    cfg = config(tmp_path, center, downstream, concurrency=4)
    proc = await Recover(*chain_args(root, cfg)).start()
    await wait_for(lambda: downstream.hanging == 4, 20, "4 checks in flight")
    proc.signal(signal.SIGINT)
    run = await proc.finish(timeout=20)
    assert run.code == 1 and "interrupted" in run.err, run.err
    assert "Traceback" not in run.err
    assert len(downstream.seen_auth) == 4  # nothing more was sent after the signal

    proc = await Recover(*chain_args(root, cfg)).start()
    await wait_for(lambda: len(downstream.seen_auth) == 8, 20, "4 checks in flight again")
    proc.signal(signal.SIGINT)
    await wait_for(lambda: "SIGINT" in proc.err_so_far(), 10, "the first signal taken")
    proc.signal(signal.SIGINT)
    run = await proc.finish(timeout=1.5)  # before the 2 s timeouts of the checks
    assert run.code == 1 and "aborted at once" in run.err, run.err
    assert "Traceback" not in run.err and "KeyboardInterrupt" not in run.err
    # Every order kept its place in DIR's ledger: the rerun verifies them all.
    downstream.hang = False
    downstream.repushed.update(oid(center, i) for i in range(40))
    downstream.invoice_all = True
    run = await recover(*chain_args(root, cfg))
    assert run.code == 0, run.out + run.err
    assert "finance: verified 40" in run.out
