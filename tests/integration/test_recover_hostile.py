"""edge-recover on what a careless operator leaves in DIR: symlinks, files it may not read,
2 GB sparse files, FIFOs and directories under ``*.json`` names (issue 19, defects 5-8).

Each is merged, or named, counted, in ``--report`` and exit 1; the rest is merged; nothing
blocks, nothing crashes, and no file outside DIR is changed.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import orjson

from tests.support.fakes import FakeCenter
from tests.support.harness import AS_NOBODY, as_sudo_cp_leaves_it
from tests.support.recover_helpers import files, merge_args, record, recover, report, write_pending

GB2 = 2 * 1024**3
RSS_LIMIT_MB = 200


def _raw(n: str) -> bytes:
    return orjson.dumps({"channel_id": "jd", "channel_order_id": n, "amount": "1.00"})


def _sparse(path: Path, size: int = GB2) -> None:
    """``truncate -s 2G``: a file of that size that costs no disk."""
    with open(path, "wb") as fh:
        fh.truncate(size)


def _targets(*paths: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in paths}


async def test_symlinked_order_files_are_merged_and_only_the_links_go(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    own = [record(i, i + 1) for i in range(3)]
    write_pending(root, own)
    # An outage's files gathered with ln -s: one from another buffer's pending/ (its only
    # copy), one raw order from another machine, one by a relative link.
    other = tmp_path / "other-buffer" / "pending"
    other.mkdir(parents=True)
    theirs = record(10, 11, node="wh-b")
    (other / theirs.filename).write_bytes(theirs.to_bytes())
    os.symlink(other / theirs.filename, root / "pending" / theirs.filename)
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    (gathered / "raw-1.json").write_bytes(_raw("raw-1"))
    os.symlink(gathered / "raw-1.json", root / "raw-1.json")
    rel = record(20, 21, node="wh-c")
    (gathered / rel.filename).write_bytes(rel.to_bytes())
    os.symlink(f"../gathered/{rel.filename}", root / rel.filename)
    before = _targets(other / theirs.filename, gathered / "raw-1.json", gathered / rel.filename)
    rep = tmp_path / "report.json"

    run = await recover(
        "--path", str(root), "--mode", "merge", "--target", center.url, "--report", str(rep)
    )

    assert run.code == 0, run.out + run.err
    keys = {r.dedupe_key for r in (*own, theirs, rel)} | {"jd:raw-1"}
    assert center.created_keys() == keys and center.duplicates() == {}
    assert _targets(*before) == before  # the targets: never moved, never changed
    assert files(root, "pending") == [] and files(root) == []  # only the links went
    merged = root / "merged"
    assert len(files(root, "merged")) == 6
    for name in files(root, "merged"):  # real files, not links that may vanish
        assert not (merged / name).is_symlink() and (merged / name).is_file()
    doc = orjson.loads((merged / theirs.filename).read_bytes())
    assert (doc["serial"], doc["body"]) == (theirs.serial, theirs.body)
    assert doc["order_id"] == center.orders[theirs.dedupe_key][0]
    assert orjson.loads((merged / rel.filename).read_bytes())["body"] == rel.body
    outcomes = {e["file"]: e["outcome"] for e in report(rep)["orders"]}
    assert outcomes[f"pending/{theirs.filename}"] == "created"
    assert outcomes["raw-1.json"] == outcomes[rel.filename] == "created"


async def test_dangling_link_and_link_to_a_fifo_are_named_counted_and_exit_1(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    write_pending(root, [record(1, 1)])
    dangling = "WH-X-20261125-000000009.json"
    os.symlink(tmp_path / "gone.json", root / "pending" / dangling)
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    os.symlink(fifo, root / "piped.json")
    rep = tmp_path / "report.json"

    run = await recover(
        *merge_args(str(root), center.url),
        "--report",
        str(rep),
        timeout=30,
    )

    assert run.code == 1, run.out + run.err
    assert "Traceback" not in run.err
    assert f"unreadable: pending/{dangling}" in run.out and "rejected: piped.json" in run.out
    entries = {e["file"]: e for e in report(rep)["orders"]}
    assert entries[f"pending/{dangling}"]["outcome"] == "unreadable"
    assert "does not exist" in entries[f"pending/{dangling}"]["error"]
    assert entries["piped.json"]["outcome"] == "rejected"
    assert "a FIFO" in entries["piped.json"]["error"]
    s = report(rep)["summary"]
    assert (s["total"], s["created"], s["unreadable"], s["rejected"]) == (3, 1, 1, 1)
    assert center.created_keys() == {"douyin:1"}
    # The dangling link stays for the operator to fix; the other is moved aside as a link,
    # and the FIFO it points to is untouched.
    assert os.path.islink(root / "pending" / dangling)
    assert os.readlink(root / "rejected" / "piped.json") == str(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    reason = orjson.loads((root / "rejected" / "piped.json.reason.json").read_bytes())
    assert reason["reason"] == "not_a_regular_file"


async def test_a_file_the_user_cannot_read_is_reported_and_the_rest_merged(
    center: FakeCenter, shared_dir: Path
):
    root = shared_dir / "buf"
    recs = [record(i, i + 1) for i in range(5)]
    write_pending(root, recs)
    (root / "loose-raw.json").write_bytes(_raw("loose-1"))
    subprocess.run(["chown", "-R", "nobody:nogroup", str(shared_dir)], check=True)
    locked = root / "pending" / recs[2].filename
    as_sudo_cp_leaves_it(locked)
    as_sudo_cp_leaves_it(root / "loose-raw.json")
    kept = _targets(locked, root / "loose-raw.json")
    common = ("--path", str(root), "--target", center.url)

    dry = shared_dir / "dry.json"
    run = await recover(*common, "--mode", "dry-run", "--report", str(dry), user=AS_NOBODY)
    assert run.code == 1, run.out + run.err
    assert f"unreadable: pending/{recs[2].filename}" in run.out
    assert "unreadable: loose-raw.json" in run.out
    assert report(dry)["summary"]["unreadable"] == 2
    problems = {p["file"]: p for p in report(dry)["problems"]}
    assert problems["loose-raw.json"]["problem"] == "unreadable"
    assert "Permission denied" in problems[f"pending/{recs[2].filename}"]["error"]

    rep = shared_dir / "merge.json"
    run = await recover(*common, "--mode", "merge", "--report", str(rep), user=AS_NOBODY)
    assert run.code == 1, run.out + run.err
    assert "Traceback" not in run.err
    assert f"unreadable: pending/{recs[2].filename}" in run.out
    assert "unreadable: loose-raw.json" in run.out
    assert center.created_keys() == {r.dedupe_key for r in recs} - {recs[2].dedupe_key}
    assert center.duplicates() == {}
    entries = {e["file"]: e for e in report(rep)["orders"]}
    assert entries[f"pending/{recs[2].filename}"]["outcome"] == "unreadable"
    assert entries["loose-raw.json"]["outcome"] == "unreadable"
    assert report(rep)["summary"]["unreadable"] == 2
    assert _targets(*kept) == kept  # left exactly where and as they were
    assert files(root, "pending") == [recs[2].filename]

    # verify, as the same user, on a merged/ copy it cannot read
    hidden = root / "merged" / recs[0].filename
    as_sudo_cp_leaves_it(hidden)
    ver = shared_dir / "verify.json"
    run = await recover(*common, "--mode", "verify", "--report", str(ver), user=AS_NOBODY)
    assert run.code == 1, run.out + run.err
    assert f"unreadable: merged/{recs[0].filename}" in run.out
    assert [p["file"] for p in report(ver)["problems"]] == [f"merged/{recs[0].filename}"]


async def test_a_2gb_sparse_file_is_never_read_whole(center: FakeCenter, tmp_path: Path):
    root = tmp_path / "buf"
    recs = [record(i, i + 1) for i in range(3)]
    write_pending(root, recs)
    _sparse(root / "huge.json")
    _sparse(root / "pending" / "WH-A-20261125-000000099.json")
    common = ("--path", str(root), "--target", center.url)

    dry = tmp_path / "dry.json"
    run = await recover(*common, "--mode", "dry-run", "--report", str(dry), rss=True)
    assert run.code == 1, run.out + run.err
    assert run.maxrss_mb < RSS_LIMIT_MB, run.maxrss_mb
    assert {p["file"] for p in report(dry)["problems"]} == {
        "huge.json",
        "pending/WH-A-20261125-000000099.json",
    }

    rep = tmp_path / "merge.json"
    run = await recover(*common, "--mode", "merge", "--report", str(rep), rss=True)
    assert run.code == 1, run.out + run.err
    assert run.maxrss_mb < RSS_LIMIT_MB, run.maxrss_mb
    assert "rejected: huge.json" in run.out
    assert "rejected: pending/WH-A-20261125-000000099.json" in run.out
    assert center.created_keys() == {r.dedupe_key for r in recs}
    # Treated like a corrupt file: moved aside whole, with its reason.
    for name in ("huge.json", "WH-A-20261125-000000099.json"):
        assert (root / "rejected" / name).stat().st_size == GB2
        reason = orjson.loads((root / "rejected" / f"{name}.reason.json").read_bytes())
        assert reason["reason"] == "too_large" and str(GB2) in reason["error"]
    entries = {e["file"]: e for e in report(rep)["orders"]}
    assert entries["huge.json"]["outcome"] == "rejected"

    _sparse(root / "merged" / "huge-copy.json")
    ver = tmp_path / "verify.json"
    run = await recover(*common, "--mode", "verify", "--report", str(ver), rss=True)
    assert run.code == 1, run.out + run.err
    assert run.maxrss_mb < RSS_LIMIT_MB, run.maxrss_mb
    assert "unreadable: merged/huge-copy.json" in run.out


async def test_fifos_and_directories_named_json_are_moved_aside_unread(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    recs = [record(i, i + 1) for i in range(3)]
    write_pending(root, recs)
    os.mkfifo(root / "pipe.json")
    os.mkfifo(root / "pending" / "WH-A-20261125-000000000.json")  # sorts first
    (root / "folder.json").mkdir()
    common = ("--path", str(root), "--target", center.url)

    run = await recover(*common, "--mode", "dry-run", timeout=30)
    assert run.code == 1, run.out + run.err
    for name in ("pipe.json", "pending/WH-A-20261125-000000000.json", "folder.json"):
        assert f"corrupt: {name}" in run.out

    rep = tmp_path / "merge.json"
    run = await recover(*common, "--mode", "merge", "--report", str(rep), timeout=30)
    assert run.code == 1, run.out + run.err
    assert center.created_keys() == {r.dedupe_key for r in recs}
    rejected = root / "rejected"
    assert stat.S_ISFIFO(os.lstat(rejected / "pipe.json").st_mode)
    assert stat.S_ISFIFO(os.lstat(rejected / "WH-A-20261125-000000000.json").st_mode)
    assert (rejected / "folder.json").is_dir()
    reason = orjson.loads((rejected / "pipe.json.reason.json").read_bytes())
    assert reason["reason"] == "not_a_regular_file" and "a FIFO" in reason["error"]
    s = report(rep)["summary"]
    assert (s["total"], s["created"], s["rejected"]) == (6, 3, 3)
    assert files(root, "pending") == [] and files(root) == []
