"""edge-recover's mover process (agent/spool/mover.py), a real child process on real
directories: it must place files exactly as ``place_in_merged`` does in-process, and a
mover that dies must cost no order and no second create."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.errors import PersistError
from agent.spool import mover as mover_module
from agent.spool.claims import try_claim
from agent.spool.mover import MoverProcess
from agent.spool.moves import MergedMove, complete_merged, place_in_merged
from agent.spool.record import ADDED_KEYS_MARK, BufferDirs, PendingRecord
from tests.support.fakes import FakeCenter
from tests.support.harness import order, wait_for
from tests.support.recover_helpers import Recover, files, merge_args, recover, write_pending
from tests.support.recover_helpers import record as recover_record

OTHER = b'{"v":1,"serial":"X","dedupe_key":"someone:else","body":"{}"}'


def record(n: int) -> PendingRecord:
    return PendingRecord(
        serial=f"wh-test-01-20261204-{n:09d}",
        node_id="wh-test-01",
        received_at="2026-12-04T10:00:00+00:00",
        channel_id="douyin",
        dedupe_key=f"douyin:{n}",
        customer_phone=None,
        body=orjson.dumps(order(str(n))).decode(),
    )


def mixed_batch(dirs: BufferDirs) -> list[MergedMove]:
    """One of each case a merge meets, claimed as the merge claims them."""
    recs = [record(n) for n in range(1, 7)]
    for rec in recs:
        (dirs.pending / rec.filename).write_bytes(rec.to_bytes())
    # 2: its name in merged/ is another order's; 3: merged/ holds this very order already
    (dirs.merged / recs[1].filename).write_bytes(OTHER)
    (dirs.merged / recs[2].filename).write_bytes(
        orjson.dumps({**recs[2].to_dict(), "order_id": "OID-earlier"})
    )
    # 4: a torn tail of an earlier attempt (keys partly added): renamed as it is
    torn = recs[3].to_bytes()[:-1] + ADDED_KEYS_MARK + b'"OID-to'
    (dirs.pending / recs[3].filename).write_bytes(torn)
    # 6: not in the record format: a new copy is written (in-process, as before)
    loose = dirs.pending / "loose.json"
    loose.write_bytes(orjson.dumps(order("loose")))
    moves = []
    for i, rec in enumerate(recs):
        claim = try_claim(dirs.pending / rec.filename, writable=True)
        assert claim is not None
        moves.append(MergedMove(claim, rec.filename, added={"order_id": f"OID-{i}", "k": i}))
    claim = try_claim(loose, writable=True)
    assert claim is not None
    moves.append(MergedMove(claim, "loose.json", document=orjson.dumps({"copy": 1})))
    # 5: gone since its claim (an operator's mv): the mover's open fails
    os.unlink(dirs.pending / recs[4].filename)
    return moves


def snapshot(dirs: BufferDirs) -> dict[str, dict[str, bytes]]:
    return {
        d.name: {p.name: p.read_bytes() for p in sorted(d.iterdir())}
        for d in (dirs.pending, dirs.merged)
    }


def outcome(moves: list[MergedMove], results: list[BaseException | None]) -> list[Any]:
    return [
        (m.name, m.added is None, m.document is None, None if r is None else (type(r), str(r)))
        for m, r in zip(moves, results, strict=True)
    ]


@pytest.fixture
def mover():
    proc = MoverProcess()
    proc.start()
    yield proc
    proc.close()


def test_the_mover_places_files_exactly_as_in_process(tmp_path: Path, mover: MoverProcess):
    """Every case of one batch, through the mover and in-process, on twin directories:
    the same answers, names, and bytes in pending/ and merged/ afterwards."""
    runs: dict[str, Any] = {}
    place: Callable[..., list[BaseException | None]]
    for how, place in (("in-process", place_in_merged), ("mover", mover.place)):
        dirs = BufferDirs(tmp_path / how)
        dirs.ensure()
        moves = mixed_batch(dirs)
        results = complete_merged(dirs.merged, moves, place(dirs.merged, moves))
        runs[how] = (outcome(moves, results), snapshot(dirs))
    assert runs["mover"] == runs["in-process"]
    answers, files = runs["mover"]
    assert [a[0] for a in answers][:2] == [
        record(1).filename,
        "wh-test-01-20261204-000000002.1.json",
    ]
    assert answers[4][3] is not None and answers[4][3][0] is PersistError  # the vanished one
    assert orjson.loads(files["merged"][record(1).filename])["order_id"] == "OID-0"
    assert files["merged"][record(2).filename] == OTHER  # never replaced
    assert not files["pending"]  # moved, dropped (held already) or gone


def test_a_mover_that_dies_costs_no_order(tmp_path: Path, mover: MoverProcess):
    """Killed in the middle of a batch: each of its files is found where the mover left
    it (still in pending/: moved in-process; already in merged/, beside another order's
    file: found by its inode), and the next batches are moved in-process. Every order
    ends in merged/ once, whole, with its order_id."""
    dirs = BufferDirs(tmp_path / "spool")
    dirs.ensure()
    recs = [record(n) for n in range(10, 16)]
    for rec in recs:
        (dirs.pending / rec.filename).write_bytes(rec.to_bytes())
    (dirs.merged / recs[2].filename).write_bytes(OTHER)

    def batch(part: list[PendingRecord]) -> list[MergedMove]:
        claims = [try_claim(dirs.pending / r.filename, writable=True) for r in part]
        return [
            MergedMove(c, r.filename, added={"order_id": r.serial})
            for c, r in zip(claims, part, strict=True)
            if c is not None
        ]

    first = batch(recs[:2])
    assert complete_merged(dirs.merged, first, mover.place(dirs.merged, first)) == [None, None]
    second = batch(recs[2:4])
    # As a mover killed after its first rename of this batch leaves it: the file beside
    # another order's (the name is taken), its order_id written; the second not moved.
    beside = dirs.merged / f"{recs[2].serial}.1.json"
    os.rename(dirs.pending / recs[2].filename, beside)
    assert mover._proc is not None
    os.kill(mover._proc.pid, signal.SIGKILL)
    assert complete_merged(dirs.merged, second, mover.place(dirs.merged, second)) == [None, None]
    assert [m.name for m in second] == [beside.name, recs[3].filename]
    third = batch(recs[4:])
    assert complete_merged(dirs.merged, third, mover.place(dirs.merged, third)) == [None, None]
    assert not os.listdir(dirs.pending)
    for rec, move in zip(recs, first + second + third, strict=True):
        doc = orjson.loads((dirs.merged / move.name).read_bytes())
        assert (doc["serial"], doc["body"]) == (rec.serial, rec.body)
        assert doc.get("order_id") == (None if move.name == beside.name else rec.serial)
    assert (dirs.merged / recs[2].filename).read_bytes() == OTHER


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


async def test_edge_recover_whose_mover_is_killed_loses_nothing_and_the_rerun_finishes(
    center: FakeCenter, tmp_path: Path
) -> None:
    """kill -9 of the mover in the middle of a real merge: the merge moves its files
    itself from there on, says so in its log, and finishes: every order in merged/,
    created once. A rerun finds nothing left to do."""
    root = tmp_path / "buf"
    n = 3000
    write_pending(root, [recover_record(i, i) for i in range(n)])
    # paced (1,000 orders/s in batches of 10): seconds of moves left when the kill comes
    proc = await Recover(*merge_args(root, center.url, "--rate", "1000", "--batch", "10")).start()
    assert proc.proc is not None
    await wait_for(lambda: len(files(root, "merged")) >= 100, 30, "100 files in merged/")
    movers = _children(proc.proc.pid)
    assert len(movers) == 1, movers  # the mover, and nothing else
    os.kill(movers[0], signal.SIGKILL)
    run = await proc.finish(timeout=60)
    assert run.code == 0, run.err
    assert "the mover process ended" in run.err and "Traceback" not in run.err
    assert len(center.creates) == n and max(center.creates.values()) == 1
    assert len(files(root, "merged")) == n and files(root, "pending") == []
    run = await recover(*merge_args(root, center.url))
    assert run.code == 0 and "total 0" in run.out, (run.out, run.err)
    assert len(center.creates) == n and max(center.creates.values()) == 1


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_the_mover_leaves_a_file_replaced_since_its_claim_untouched(
    tmp_path: Path, mover: MoverProcess, kind: str
):
    """The mover opens files by path: one replaced after the claim (an operator's mv over
    it) is not the claimed file, and the claimed file's tail offset would cut it short.
    It is left as it is, in pending/, and the move is reported failed; a FIFO put there
    does not block the mover."""
    dirs = BufferDirs(tmp_path / "spool")
    dirs.ensure()
    rec, other = record(20), record(21)
    path = dirs.pending / rec.filename
    path.write_bytes(rec.to_bytes())
    claim = try_claim(path, writable=True)
    assert claim is not None
    replacement = dirs.pending / ".replacement"
    if kind == "file":
        replacement.write_bytes(other.to_bytes())
    else:
        os.mkfifo(replacement)
    os.rename(replacement, path)
    moves = [MergedMove(claim, rec.filename, added={"order_id": "OID-20"})]
    (result,) = complete_merged(dirs.merged, moves, mover.place(dirs.merged, moves))
    assert isinstance(result, PersistError), result
    if kind == "file":
        assert "replaced since the merge claimed it" in str(result)
        assert path.read_bytes() == other.to_bytes()
    else:
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
    assert not os.listdir(dirs.merged)


def test_a_mover_that_cannot_start_leaves_the_moves_to_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A child that exits before it says ``ready`` (its code would not import, say): the
    first group is moved in-process, as every later one, and the log says why."""
    monkeypatch.setattr(mover_module, "_CHILD", "import sys; sys.exit(3)  # {root}")
    broken = MoverProcess()
    broken.start()
    dirs = BufferDirs(tmp_path / "spool")
    dirs.ensure()
    rec = record(30)
    (dirs.pending / rec.filename).write_bytes(rec.to_bytes())
    claim = try_claim(dirs.pending / rec.filename, writable=True)
    assert claim is not None
    moves = [MergedMove(claim, rec.filename, added={"order_id": "OID-30"})]
    try:
        assert complete_merged(dirs.merged, moves, broken.place(dirs.merged, moves)) == [None]
    finally:
        broken.close()
    assert "the mover process ended (exit 3" in caplog.text
    assert orjson.loads((dirs.merged / rec.filename).read_bytes())["order_id"] == "OID-30"
    assert not os.listdir(dirs.pending)
