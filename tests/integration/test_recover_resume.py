"""Resume: SIGKILL at several points then rerun, SIGINT then rerun -> each order exactly once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import orjson
import pytest

from agent.spool.record import PendingRecord
from tests.support.fakes import FakeCenter
from tests.support.recover_helpers import (
    Recover,
    body,
    files,
    kill_when,
    merge_args,
    record,
    recover,
    report,
    write_pending,
)

N = 1200


def _buffer(root: Path) -> tuple[set[str], int]:
    """N records, 60 same-body duplicates from another node, 4 raw loose orders.
    Returns (every dedupe key, number of files)."""
    recs = [record(i, i + 1) for i in range(N)]
    recs += [record(i, 70_000 + i, node="wh-b") for i in range(0, N, 20)]
    write_pending(root, recs)
    for i in range(4):
        (root / f"raw-{i}.json").write_text(body(f"raw{i}"))
    return {r.dedupe_key for r in recs} | {f"douyin:raw{i}" for i in range(4)}, len(recs) + 4


def _no_temp_files(root: Path) -> bool:
    return not [n for _, _, names in os.walk(root) for n in names if n.endswith(".tmp")]


def _assert_all_merged_once(root: Path, center: FakeCenter, keys: set[str], n_files: int):
    assert center.duplicates() == {}
    assert set(center.creates) == keys  # every order exactly once
    assert files(root, "pending") == [] and files(root) == []
    assert files(root, "rejected") == []
    merged = files(root, "merged")
    assert len(merged) == n_files
    for name in merged:  # audit copies are whole, with the center's order_id
        doc = orjson.loads((root / "merged" / name).read_bytes())
        record_ = PendingRecord.from_dict(
            {
                k: v
                for k, v in doc.items()
                if k not in ("order_id", "cluster", "merged_at", "target", "duplicate_of")
            }
        )
        assert doc["order_id"] == center.orders[record_.dedupe_key][0], name
        assert center.orders[record_.dedupe_key][1] == record_.raw_body
    assert _no_temp_files(root)


def _leftovers(root: Path, tmp: Path) -> list[str]:
    """What a run left outside the buffer's own files: scratch files in its TMPDIR, the
    checkpoint in DIR."""
    return sorted(os.listdir(tmp)) + sorted(n for n in os.listdir(root) if n.startswith("."))


async def test_sigkill_at_several_points_then_rerun_is_exactly_once(
    center: FakeCenter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    root = tmp_path / "buf"
    scratch = tmp_path / "tmpdir"  # edge-recover's TMPDIR: a kill -9 must leave nothing here
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    keys, n_files = _buffer(root)
    center.delay_s = 0.01
    args = (
        *merge_args(str(root), center.url),
        "--batch",
        "20",
        "--concurrency",
        "2",
    )
    points = [
        (lambda: (root / ".edge-recover.db").exists(), "checkpoint opened (scan)"),
        (lambda: len(center.received) >= 1, "first batch at the center"),
        (lambda: len(files(root, "merged")) >= n_files // 3, "a third merged"),
        (lambda: len(files(root, "pending")) <= 60, "only losers left"),
    ]
    killed = 0
    for predicate, what in points:
        proc = await Recover(*args).start()
        await kill_when(proc, predicate, signal.SIGKILL, what)
        run = await proc.finish()
        assert run.code in (-signal.SIGKILL, 0), run.err
        killed += run.code == -signal.SIGKILL
        assert os.listdir(scratch) == []
    assert killed >= 3  # the points were really hit mid-run, not after the end
    center.delay_s = 0
    rep = tmp_path / "final.json"
    run = await recover(*args, "--report", str(rep))
    assert run.code == 0, run.err
    _assert_all_merged_once(root, center, keys, n_files)
    assert _leftovers(root, scratch) == []  # finished: the checkpoint is gone too
    # The losers resolved in the final run (if any) are reported as duplicates.
    for entry in report(rep)["orders"]:
        assert entry["outcome"] in ("created", "duplicate"), entry
        if entry["serial"].startswith("WH-B-"):
            assert entry["outcome"] == "duplicate"


async def test_sigint_finishes_in_flight_requests_then_rerun_completes(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    keys, n_files = _buffer(root)
    center.delay_s = 0.05
    args = (
        *merge_args(str(root), center.url),
        "--batch",
        "10",
        "--concurrency",
        "4",
    )
    proc = await Recover(*args, "--report", str(tmp_path / "first.json")).start()
    await kill_when(proc, lambda: len(files(root, "merged")) >= 100, signal.SIGINT, "100 merged")
    run = await proc.finish(timeout=15)
    assert run.code == 1, run.err
    assert "interrupted" in run.err and "run again to resume" in run.err
    # In-flight requests were finished and settled: what the center created is in merged/.
    merged_keys = {
        orjson.loads((root / "merged" / n).read_bytes())["dedupe_key"]
        for n in files(root, "merged")
    }
    assert set(center.creates) == merged_keys
    assert len(files(root, "pending")) + len(files(root)) + len(files(root, "merged")) == n_files
    assert _no_temp_files(root)
    first = report(tmp_path / "first.json")
    assert first["summary"]["interrupted"] is True
    assert first["summary"]["created"] == len(center.creates)
    center.delay_s = 0
    run = await recover(*args, "--report", str(tmp_path / "second.json"))
    assert run.code == 0, run.err
    _assert_all_merged_once(root, center, keys, n_files)
    second = report(tmp_path / "second.json")["summary"]
    assert second["created"] + len(merged_keys) == len(keys)


async def test_a_file_killed_while_its_keys_were_added_is_merged_whole(
    center: FakeCenter, tmp_path: Path
):
    """SIGKILL (or a crash) between adding order_id and the rename leaves a pending file
    with the keys added, or with a torn tail: the order before them is intact."""
    root = tmp_path / "buf"
    whole, torn = record(1, 1), record(2, 2)
    for r in (whole, torn):
        center.orders[r.dedupe_key] = (f"OC-{r.dedupe_key}", r.raw_body)  # confirmed before
    pending = root / "pending"
    pending.mkdir(parents=True)
    (pending / whole.filename).write_bytes(
        whole.to_bytes()[:-1] + b',"order_id":"OC-douyin:1","cluster":"recover"}'
    )
    (pending / torn.filename).write_bytes(torn.to_bytes()[:-1] + b',"order_id":"OC-dou')
    rep = tmp_path / "r.json"
    run = await recover(
        "--path", str(root), "--mode", "merge", "--target", center.url, "--report", str(rep)
    )
    assert run.code == 0, run.err
    assert center.creates == {} and files(root, "pending") == []
    for r in (whole, torn):
        doc = orjson.loads((root / "merged" / r.filename).read_bytes())
        assert doc["order_id"] == f"OC-{r.dedupe_key}" and doc["body"] == r.body
    assert {e["outcome"] for e in report(rep)["orders"]} == {"duplicate"}
