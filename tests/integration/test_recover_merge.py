"""edge-recover --mode merge / dry-run, as ops run it: a real subprocess against a real center."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.support.fakes import FakeCenter, free_port
from tests.support.recover_helpers import (
    body,
    files,
    merge_args,
    record,
    recover,
    report,
    snapshot,
    write_pending,
)


def _buffer_with_duplicates(root: Path, n: int) -> dict[str, str]:
    """n orders from node A; every 10th again from node B (same body, later serial); every
    100th (offset 5) again from node C with another body. Returns key -> winning serial."""
    recs = [record(i, i + 1) for i in range(n)]
    recs += [record(i, 50_000 + i, node="wh-b") for i in range(0, n, 10)]
    recs += [
        record(i, 90_000 + i, node="wh-c", text=body(i, amount="1.00")) for i in range(5, n, 100)
    ]
    write_pending(root, recs)
    return {r.dedupe_key: r.serial for r in recs[:n]}


async def test_merge_dedupes_inside_the_directory_and_against_the_center(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    winners = _buffer_with_duplicates(root, 3000)
    # One order reached the center before the outage ended: the center dedupes it.
    center.orders["douyin:7"] = ("OC-EARLY", record(7, 8).raw_body)
    rep = tmp_path / "report.json"
    run = await recover(
        "--path", str(root), "--mode", "merge", "--target", center.url, "--report", str(rep)
    )
    assert run.code == 1, run.err  # the 30 conflicting copies are listed: not "all fine"
    assert center.duplicates() == {}
    assert set(center.orders) == set(winners)
    assert len(center.creates) == 2999  # douyin:7 existed already
    assert files(root, "pending") == []
    merged = files(root, "merged")
    assert len(merged) == 3000 + 300
    # Each winner's audit copy is the record plus the center's order_id.
    doc = orjson.loads((root / "merged" / f"{winners['douyin:3']}.json").read_bytes())
    assert doc["order_id"] == center.orders["douyin:3"][0]
    assert doc["body"] == record(3, 4).body and doc["dedupe_key"] == "douyin:3"
    # A loser points to its winner.
    loser = orjson.loads((root / "merged" / "WH-B-20261125-000050010.json").read_bytes())
    assert loser["duplicate_of"] == winners["douyin:10"]
    assert loser["order_id"] == center.orders["douyin:10"][0]
    # Different body under a merged key: a conflict, quarantined with its reason.
    rejected = files(root, "rejected")
    assert "WH-C-20261125-000090005.json" in rejected
    reason = orjson.loads(
        (root / "rejected" / "WH-C-20261125-000090005.json.reason.json").read_bytes()
    )
    assert reason["reason"] == "conflict" and winners["douyin:5"] in reason["error"]
    summary = report(rep)["summary"]
    assert (
        summary["total"],
        summary["created"],
        summary["duplicate"],
        summary["conflict"],
        summary["rejected"],
    ) == (3330, 2999, 301, 30, 0)
    entries = {e["serial"]: e for e in report(rep)["orders"]}
    assert len(entries) == 3330
    assert entries[winners["douyin:7"]]["outcome"] == "duplicate"  # 200 from the center
    assert entries["WH-B-20261125-000050010"]["duplicate_of"] == winners["douyin:10"]
    assert entries[winners["douyin:1"]]["order_id"] == center.orders["douyin:1"][0]
    assert "total 3330, created 2999, duplicate 301" in run.out
    assert center.batch_requests > 0 and max(center.batch_sizes) == 100


async def test_dry_run_changes_nothing_and_lists_duplicate_groups(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    _buffer_with_duplicates(root, 500)
    (root / "loose-raw.json").write_bytes(
        orjson.dumps({"channel_id": "jd", "channel_order_id": "x1"})
    )
    before = snapshot(root)
    rep = tmp_path / "dry.json"
    run = await recover(
        "--path", str(root), "--mode", "dry-run", "--target", center.url, "--report", str(rep)
    )
    assert run.code == 1, run.err  # it predicts the 5 conflicts
    assert snapshot(root) == before
    assert center.received == [] and center.batch_requests == 0
    assert center.health_checks >= 1
    doc = report(rep)
    s = doc["summary"]
    assert (
        s["files"],
        s["to_send"],
        s["duplicate_groups"],
        s["duplicates"],
        s["conflicts"],
        s["corrupt"],
    ) == (556, 501, 55, 50, 5, 0)
    groups = {g["dedupe_key"]: g for g in doc["duplicate_groups"]}
    assert groups["douyin:10"] == {
        "dedupe_key": "douyin:10",
        "winner": "WH-A-20261125-000000011",
        "duplicates": ["WH-B-20261125-000050010"],
        "same_body": True,
    }
    assert groups["douyin:5"]["same_body"] is False
    assert "douyin:10: WH-A-20261125-000000011 wins over WH-B-20261125-000050010" in run.out


async def test_partly_accepted_batch_retries_only_the_items_that_need_it(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    write_pending(root, [record(i, i + 1) for i in range(10)])
    # First batch: items 4 and 5 get 503 and 429; the rest are created.
    center.item_script.extend([0, 0, 0, 0, 503, 429, 0, 0, 0, 0])
    run = await recover(
        "--path", str(root), "--mode", "merge", "--target", center.url, "--batch", "10"
    )
    assert run.code == 0, run.err
    sends = center.sends()
    assert sorted(sends.values()) == [1] * 8 + [2, 2]
    assert center.duplicates() == {} and len(center.creates) == 10
    assert files(root, "pending") == [] and len(files(root, "merged")) == 10


async def test_no_bulk_import_falls_back_to_single_posts(center: FakeCenter, tmp_path: Path):
    center.batch_enabled = False
    root = tmp_path / "buf"
    write_pending(root, [record(i, i + 1) for i in range(300)])
    run = await recover("--path", str(root), "--mode", "merge", "--target", center.url)
    assert run.code == 0, run.err
    assert "no bulk import" in run.err
    assert len(center.creates) == 300 and center.duplicates() == {}
    assert all(r.headers.get("Idempotency-Key") == r.key for r in center.received)
    assert len(center.received) == 300  # each order once, as its own POST
    assert files(root, "pending") == []


async def test_422_and_other_4xx_are_quarantined_and_reported(center: FakeCenter, tmp_path: Path):
    root = tmp_path / "buf"
    recs = [record(i, i + 1) for i in range(4)]
    write_pending(root, recs)
    center.script.extend([422, 400])
    rep = tmp_path / "r.json"
    run = await recover(
        *merge_args(str(root), center.url),
        "--batch",
        "1",
        "--concurrency",
        "1",
        "--report",
        str(rep),
    )
    assert run.code == 1
    entries = report(rep)["orders"]
    by_outcome = {e["outcome"]: e for e in entries}
    assert sorted(e["outcome"] for e in entries) == ["conflict", "created", "created", "rejected"]
    conflict, refused = by_outcome["conflict"], by_outcome["rejected"]
    assert "HTTP 400" in refused["error"] and "HTTP 422" in conflict["error"]
    assert files(root, "rejected") == sorted(
        [
            f"{conflict['serial']}.json",
            f"{conflict['serial']}.json.reason.json",
            f"{refused['serial']}.json",
            f"{refused['serial']}.json.reason.json",
        ]
    )
    reason = orjson.loads(
        (root / "rejected" / f"{refused['serial']}.json.reason.json").read_bytes()
    )
    assert reason["status"] == 400 and reason["dedupe_key"] == refused["dedupe_key"]
    assert set(center.creates) == {r.dedupe_key for r in recs} - {
        conflict["dedupe_key"],
        refused["dedupe_key"],
    }
    assert files(root, "pending") == []


async def test_corrupt_files_are_quarantined_and_loose_files_merged(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    good = [record(i, i + 1) for i in range(3)]
    write_pending(root, good)
    (root / "pending" / "AAA-broken.json").write_bytes(b'{"v":1,"serial":"AAA-br')
    (root / "pending" / "AAB-fields.json").write_bytes(orjson.dumps({"v": 1, "serial": "x"}))
    (root / "not-an-order.json").write_bytes(b'{"hello": "world"}')
    raw = orjson.dumps({"channel_id": "jd", "channel_order_id": "777", "amount": 5.10})
    (root / "old-tool-777.json").write_bytes(raw)
    other = record("m", 42, node="wh-z")
    (root / "from-other-machine.json").write_bytes(other.to_bytes())
    rep = tmp_path / "r.json"
    run = await recover(
        "--path", str(root), "--mode", "merge", "--target", center.url, "--report", str(rep)
    )
    assert run.code == 1
    rejected = files(root, "rejected")
    for name in ("AAA-broken.json", "AAB-fields.json", "not-an-order.json"):
        assert name in rejected and f"{name}.reason.json" in rejected
    assert (root / "rejected" / "AAA-broken.json").read_bytes() == b'{"v":1,"serial":"AAA-br'
    assert files(root) == []  # nothing loose is left
    assert center.orders["jd:777"][1] == raw  # byte for byte
    assert center.orders["douyin:m"][1] == other.raw_body
    entries = {e["file"]: e for e in report(rep)["orders"]}
    assert entries["old-tool-777.json"]["serial"].startswith("RCV-X-")
    assert entries["old-tool-777.json"]["outcome"] == "created"
    assert entries["pending/AAA-broken.json"]["outcome"] == "rejected"
    assert "corrupt" in entries["pending/AAA-broken.json"]["error"]
    merged_raw = orjson.loads(
        (root / "merged" / f"{entries['old-tool-777.json']['serial']}.json").read_bytes()
    )
    assert merged_raw["dedupe_key"] == "jd:777" and merged_raw["body"] == raw.decode()


async def test_unreachable_target_exits_3_and_touches_nothing(tmp_path: Path):
    root = tmp_path / "buf"
    write_pending(root, [record(1, 1)])
    before = snapshot(root)
    run = await recover(
        "--path", str(root), "--mode", "merge", "--target", f"http://127.0.0.1:{free_port()}/v3"
    )
    assert run.code == 3
    assert "unreachable" in run.err
    assert snapshot(root) == before


async def test_usage_errors_exit_2_with_one_line(tmp_path: Path):
    (tmp_path / "buf").mkdir()
    run = await recover("--path", str(tmp_path / "buf"), "--mode", "merge")
    assert run.code == 2 and "no target" in run.err
    assert len(run.err.strip().splitlines()) == 1
    run = await recover(
        "--path", str(tmp_path / "nope"), "--mode", "merge", "--target", "http://127.0.0.1:1/v3"
    )
    assert run.code == 2 and "not a directory" in run.err
    run = await recover("--path", str(tmp_path), "--mode", "bogus")
    assert run.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nnode_id = 5\n")
    run = await recover("--path", str(tmp_path / "buf"), "--mode", "merge", "--config", str(bad))
    assert run.code == 2 and "agent.node_id" in run.err


async def test_target_defaults_to_the_configured_primary(center: FakeCenter, tmp_path: Path):
    from tests.support.harness import write_config

    cfg = write_config(tmp_path, center.url)
    root = tmp_path / "buf"
    write_pending(root, [record(i, i + 1) for i in range(5)])
    (root / "raw.json").write_bytes(orjson.dumps({"channel_id": "jd", "channel_order_id": "1"}))
    rep = tmp_path / "r.json"
    run = await recover(
        "--path", str(root), "--mode", "merge", "--config", str(cfg), "--report", str(rep)
    )
    assert run.code == 0, run.err
    assert len(center.creates) == 6
    serials = {e["file"]: e["serial"] for e in report(rep)["orders"]}
    assert serials["raw.json"].startswith("RCV-WH-TEST-01-")  # node_id from the config


async def test_rate_caps_orders_per_second(center: FakeCenter, tmp_path: Path):
    root = tmp_path / "buf"
    write_pending(root, [record(i, i + 1) for i in range(60)])
    rep = tmp_path / "r.json"
    run = await recover(
        *merge_args(str(root), center.url),
        "--batch",
        "10",
        "--rate",
        "40",
        "--report",
        str(rep),
    )
    assert run.code == 0, run.err
    # 6 requests of 10 orders at 40 orders/s: the last one leaves >= 1.25 s after the first.
    assert report(rep)["summary"]["elapsed_s"] >= 1.2
    assert len(center.creates) == 60 and center.batch_requests == 6
