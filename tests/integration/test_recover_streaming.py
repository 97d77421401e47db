"""edge-recover streams: files are sent as they are met, and each dedupe key still goes to its
lowest serial -- also when that file sits loose in DIR, lies in another chunk, or is held by
the agent at the moment the merge meets it."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from unittest import mock

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.spool.record import is_order_file
from recovery import listing
from recovery.listing import SortedNames
from tests.support.fakes import FakeCenter
from tests.support.harness import wait_for
from tests.support.recover_helpers import (
    Recover,
    body,
    files,
    record,
    recover,
    report,
    write_pending,
)


def test_pending_names_are_listed_in_name_order_whatever_the_directory_says(tmp_path: Path):
    names = [f"WH-B-20261125-{n:09d}.json" for n in (7, 1, 300, 42)]
    names += [f"WH-A-20261126-{n:09d}.json" for n in (999_999_999, 5)]
    names += ["odd.json", "WH-A-20261126-7.json", "zz-copied-by-hand.json", "Z-1234567890.json"]
    for name in names:
        (tmp_path / name).write_bytes(b"{}")
    for ignored in (".hidden.json", "x.json.reason.json", "notes.txt", "x.json.tmp"):
        (tmp_path / ignored).write_bytes(b"{}")
    # Listed whatever it is: the merge reports it and moves it aside, never in silence.
    (tmp_path / "dir.json").mkdir()
    names.append("dir.json")
    listed = SortedNames(tmp_path)
    assert list(listed) == sorted(names)
    assert len(listed) == len(names)


async def test_a_loose_file_with_a_lower_serial_wins_over_pending(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    # 600 pending orders: the contested one lies in the third chunk of 256.
    recs = [record(i, 10 + i, node="wh-b") for i in range(600)]
    write_pending(root, recs)
    contested = recs[555]
    loose = record(555, 3, node="wh-a", text=body(555, amount="2.00"))
    (root / "copied-from-wh-a.json").write_bytes(loose.to_bytes())
    rep = tmp_path / "r.json"
    run = await recover(
        "--path", str(root), "--mode", "merge", "--target", center.url, "--report", str(rep)
    )
    assert run.code == 1, run.err  # the conflict is listed
    assert center.orders["douyin:555"][1] == loose.raw_body
    assert center.duplicates() == {} and len(center.orders) == 600
    assert f"{contested.serial}.json" in files(root, "rejected")
    reason = orjson.loads((root / "rejected" / f"{contested.serial}.json.reason.json").read_bytes())
    assert reason["reason"] == "conflict" and loose.serial in reason["error"]
    entries = {e["serial"]: e for e in report(rep)["orders"]}
    assert entries[loose.serial]["outcome"] == "created"
    assert entries[contested.serial]["outcome"] == "conflict"
    assert files(root, "pending") == [] and files(root) == []


async def test_a_file_the_agent_holds_keeps_its_place_in_its_dedupe_group(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    first = record(7, 1, node="wh-a")
    later = record(7, 9, node="wh-b", text=body(7, amount="9.99"))  # same key, other body
    others = [record(100 + i, 100 + i, node="wh-c") for i in range(20)]
    write_pending(root, [first, later, *others])
    # The agent's drain holds the first file (the same flock it takes) when the merge starts.
    fd = os.open(root / "pending" / first.filename, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    rep = tmp_path / "r.json"
    proc = await Recover(
        "--path", str(root), "--mode", "merge", "--target", center.url, "--report", str(rep)
    ).start()
    try:
        await wait_for(
            lambda: len(center.orders) >= len(others), 30, "the orders nobody holds to be delivered"
        )
        assert "douyin:7" not in center.orders  # the later serial waits for the held one
    finally:
        os.close(fd)  # the drain lets go without delivering it
    run = await proc.finish()
    assert run.code == 1, run.err  # the later serial is a conflict
    assert center.orders["douyin:7"][1] == first.raw_body
    assert next(r.body for r in center.received if r.key == "douyin:7") == first.raw_body
    entries = {e["serial"]: e for e in report(rep)["orders"]}
    assert entries[first.serial]["outcome"] == "created"
    assert entries[later.serial]["outcome"] == "conflict"
    assert f"{later.serial}.json" in files(root, "rejected")
    assert files(root, "pending") == []


async def test_an_order_confirmed_before_a_kill_is_moved_on_rerun_without_a_request(
    center: FakeCenter, tmp_path: Path
):
    """SIGKILL between the checkpoint's commit and the rename leaves a confirmed order in
    pending/: the rerun moves it with the center's order_id, and its later duplicate is
    settled against it, neither sent again."""
    from recovery.checkpoint import CHECKPOINT_NAME, Checkpoint, ResultRow
    from recovery.source import body_digest

    root = tmp_path / "buf"
    done, dup = record(1, 1), record(1, 2, node="wh-b")
    fresh = [record(10 + i, 10 + i) for i in range(5)]
    write_pending(root, [done, dup, *fresh])
    ck = Checkpoint(root / CHECKPOINT_NAME, run=1)
    ck.write(
        [
            ResultRow(
                done.serial,
                done.dedupe_key,
                f"pending/{done.filename}",
                "created",
                "OC-BEFORE-THE-KILL",
                digest=body_digest(done),
            )
        ]
    )
    ck.close()
    run = await recover("--path", str(root), "--mode", "merge", "--target", center.url)
    assert run.code == 0, run.err
    assert {r.key for r in center.received} == {r.dedupe_key for r in fresh}
    moved = orjson.loads((root / "merged" / done.filename).read_bytes())
    assert moved["order_id"] == "OC-BEFORE-THE-KILL"
    loser = orjson.loads((root / "merged" / dup.filename).read_bytes())
    assert loser["duplicate_of"] == done.serial and loser["order_id"] == "OC-BEFORE-THE-KILL"
    assert files(root, "pending") == []


_PREFIXES = ["WH-B-20261125-", "WH-A-20261126-", "a.b+c-", "X(1)-", "é-", "0-"]
_agent_names = st.builds(
    lambda prefix, n: f"{prefix}{n:09d}.json",
    st.sampled_from(_PREFIXES),
    st.one_of(st.integers(0, 300), st.integers(0, 999_999_999)),
)
_other_names = st.one_of(
    st.text(
        st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=40,
    ).map(lambda t: f"{t}.json"),
    # near misses: 8 or 10 digits, no "-", Arabic-Indic digits, a hidden or reason file
    st.sampled_from(
        [
            "WH-A-20261126-12345678.json",
            "WH-A-20261126-1234567890.json",
            "WHA20261126000000001.json",
            "WH-A-20261126-١٢٣٤٥٦٧٨٩.json",
            ".WH-A-20261126-000000001.json",
            "WH-A-20261126-000000001.json.reason.json",
            "WH-A-20261126-000000001.json.tmp",
            "x\nWH-A-20261126-000000009.json",
            "-000000001.json",
            "ZWH-A-20261126-000000002.json",
            "x0-000000003.json",
            "WH-A-20261126-000000004.jsonx",
        ]
    ),
)


_NEAR_MISSES = {  # among many agent names of their prefix: most meet its regex pass
    *(f"WH-A-20261126-{n:09d}.json" for n in range(64)),
    "WH-A-20261126-١٢٣٤٥٦٧٨٩.json",
    "ZWH-A-20261126-000000002.json",
    "WH-A-20261126-000000004.jsonx",
    "WH-A-20261126-0000000050.json",
    "x\nWH-A-20261126-000000009.json",
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(names=_NEAR_MISSES, chunk=4)
@given(
    names=st.sets(st.one_of(_agent_names, _other_names), max_size=60),
    chunk=st.sampled_from([1, 3, 7, 65536]),
)
def test_the_listing_is_every_order_file_in_name_order(names: set[str], chunk: int):
    """Whatever the names (agent names under several prefixes, dense or sparse, and
    anything else a directory can hold), the listing is exactly the visible *.json names
    in byte-wise order, however the names fall into the bulk steps' chunks."""
    names = {n for n in names if len(n.encode("utf-8", "surrogateescape")) <= 255}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            (Path(tmp) / name).write_bytes(b"{}")
        with mock.patch.object(listing, "CHUNK", chunk):
            listed = SortedNames(Path(tmp))
        expected = sorted(n for n in names if is_order_file(n))
        assert list(listed) == expected
        assert len(listed) == len(expected)
