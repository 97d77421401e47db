"""No rename ever replaces an order file (DESIGN 10), on real directories.

A second agent on one buffer issued the serials of the first, and its rename
into pending/ silently replaced an order answered 202. Every move into
pending/, merged/ and rejected/ now fails (or goes beside) where the name is
taken: the file already there is never touched.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.base.syscalls import link_then_unlink, rename_noreplace
from agent.errors import PersistError
from agent.spool.claims import try_claim
from agent.spool.file_proc import FileSteps
from agent.spool.files import quarantine
from agent.spool.moves import MergedMove, complete_merged, move_to_merged, place_in_merged
from agent.spool.record import BufferDirs, PendingRecord
from tests.support.fakes import FakeCenter
from tests.support.harness import order

FOREIGN = b'{"v":1,"serial":"X","dedupe_key":"someone:else","body":"{}"}'


def record(serial: str, key: str = "douyin:1") -> PendingRecord:
    return PendingRecord(
        serial=serial,
        node_id="wh-test-01",
        received_at="2026-12-03T10:00:00+00:00",
        channel_id="douyin",
        dedupe_key=key,
        customer_phone=None,
        body=orjson.dumps(order(key.split(":")[1])).decode(),
    )


@pytest.fixture
def dirs(tmp_path: Path) -> BufferDirs:
    d = BufferDirs(tmp_path / "spool")
    d.ensure()
    return d


@pytest.mark.parametrize(
    "move", [rename_noreplace, link_then_unlink], ids=["renameat2", "link-unlink"]
)
def test_the_primitive_never_replaces(tmp_path: Path, move: Any):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        move(src, dst)
    assert (src.read_bytes(), dst.read_bytes()) == (b"new", b"old")
    dst.unlink()
    move(src, dst)
    assert not src.exists() and dst.read_bytes() == b"new"


def test_a_pending_file_at_the_target_name_is_never_replaced(dirs: BufferDirs):
    taken = dirs.pending / "wh-test-01-20261203-000000007.json"
    taken.write_bytes(FOREIGN)
    clash, fine = (
        record("wh-test-01-20261203-000000007"),
        record("wh-test-01-20261203-000000008", "douyin:2"),
    )
    out = io.BytesIO()
    steps = FileSteps(str(dirs.pending), 2, out)  # the pending/ writer process's steps
    for r in (clash, fine):
        steps.put(r.filename, r.to_bytes())
    steps.close()
    assert sorted(out.getvalue().decode().splitlines()) == [
        f"{clash.filename} exists",
        f"{fine.filename} ok",  # the other orders are not held up
    ]
    assert taken.read_bytes() == FOREIGN
    assert sorted(os.listdir(dirs.pending)) == [taken.name, fine.filename]  # no temp left


async def test_intake_answers_503_for_a_serial_whose_file_exists(
    make_agent: Any, center: FakeCenter, caplog: pytest.LogCaptureFixture
):
    """The serial counter went backwards somehow: no 202, the existing order untouched."""
    await center.go_down()
    agent = await make_agent(center.url)
    status, body = await agent.post(order(1))
    assert status == 202, body
    prefix, n = body["serial"].rsplit("-", 1)
    taken = agent.spool / "pending" / f"{prefix}-{int(n) + 1:09d}.json"
    taken.write_bytes(FOREIGN)
    with caplog.at_level(logging.ERROR, logger="agent.intake"):
        status, body = await agent.post(order(2))
    assert status == 503, body
    assert "already exists" in body["error"]
    assert taken.read_bytes() == FOREIGN
    assert any(
        taken.name in r.getMessage() and f".{taken.name}.tmp" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    status, body = await agent.post(order(3))  # the next serial is free again
    assert status == 202, body


def test_quarantine_never_replaces_a_file_in_rejected(dirs: BufferDirs):
    name = "wh-test-01-20261203-000000001.json"
    orphan = dirs.rejected / f"{name}.reason.json"  # a reason whose file went elsewhere
    orphan.write_bytes(b'{"reason":"earlier"}')
    src = dirs.pending / name
    src.write_bytes(record("wh-test-01-20261203-000000001").to_bytes())
    where = quarantine(dirs, src, {"reason": "corrupt"})
    assert where.name == "wh-test-01-20261203-000000001.1.json"
    assert orphan.read_bytes() == b'{"reason":"earlier"}'
    reason = orjson.loads((dirs.rejected / f"{where.name}.reason.json").read_bytes())
    assert reason["reason"] == "corrupt"
    assert not src.exists()


def test_the_drain_move_into_merged_never_replaces(dirs: BufferDirs):
    """A name taken between the check and the rename (here: a dangling symlink, which
    the check does not see) stays; the order stays in pending/."""
    rec = record("wh-test-01-20261203-000000002")
    src = dirs.pending / rec.filename
    src.write_bytes(rec.to_bytes())
    os.symlink("nowhere", dirs.merged / rec.filename)
    claim = try_claim(src, writable=True)
    assert claim is not None
    try:
        with pytest.raises(PersistError, match="exists"):
            move_to_merged(dirs, claim, rec, "OID-2", "primary")
    finally:
        claim.release()
    assert os.readlink(dirs.merged / rec.filename) == "nowhere"
    assert orjson.loads(src.read_bytes())["serial"] == rec.serial


@pytest.mark.parametrize("same", [False, True], ids=["another-order", "this-order"])
def test_edge_recover_moves_into_merged_never_replace(dirs: BufferDirs, same: bool):
    rec = record("wh-test-01-20261203-000000003")
    src = dirs.pending / rec.filename
    src.write_bytes(rec.to_bytes())
    there = orjson.dumps({**rec.to_dict(), "order_id": "OID-earlier"}) if same else FOREIGN
    (dirs.merged / rec.filename).write_bytes(there)
    claim = try_claim(src, writable=True)
    assert claim is not None
    moves = [MergedMove(claim, rec.filename, added={"order_id": "OID-3"})]
    results = complete_merged(dirs.merged, moves, place_in_merged(dirs.merged, moves))
    assert results == [None]
    assert (dirs.merged / rec.filename).read_bytes() == there  # untouched either way
    assert not src.exists()
    if same:
        assert sorted(os.listdir(dirs.merged)) == [rec.filename]
    else:
        beside = dirs.merged / "wh-test-01-20261203-000000003.1.json"
        doc = orjson.loads(beside.read_bytes())
        assert (doc["serial"], doc["order_id"]) == (rec.serial, "OID-3")
        assert moves[0].name == beside.name


def test_edge_recover_new_copy_into_merged_goes_beside(dirs: BufferDirs, tmp_path: Path):
    """A loose file's new merged/ copy (``document``) never replaces either."""
    loose = tmp_path / "spool" / "x.json"
    loose.write_bytes(orjson.dumps(order(4)))
    (dirs.merged / "x.json").write_bytes(FOREIGN)
    claim = try_claim(loose, writable=True)
    assert claim is not None
    doc = orjson.dumps({**record("RCV-WH-1", "douyin:4").to_dict(), "order_id": "OID-4"})
    moves = [MergedMove(claim, "x.json", document=doc)]
    results = complete_merged(dirs.merged, moves, place_in_merged(dirs.merged, moves))
    assert results == [None]
    assert (dirs.merged / "x.json").read_bytes() == FOREIGN
    assert (dirs.merged / "x.1.json").read_bytes() == doc
    assert not loose.exists()
    assert not [n for n in os.listdir(dirs.merged) if n.startswith(".")]
