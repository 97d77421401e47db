"""Which file of a dedupe key edge-recover sends: an order the agent answered 202 for
(its record file) wins over a loose raw order object of unknown origin, whatever the
node names sort like; among record files the lowest serial wins. Dry-run predicts
exactly what merge does."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.support.fakes import FakeCenter
from tests.support.recover_helpers import (
    body,
    files,
    merge_args,
    record,
    recover,
    report,
    write_pending,
)


def _buffer(root: Path) -> dict[str, str]:
    """Three keys, each held by the agent's own record in pending/ and by a loose raw
    object with another body; one key also by a loose record of another agent with a
    lower serial. Returns key -> the serial that must win."""
    acked = [record(i, i + 1, node="wh-sh-01") for i in range(3)]
    write_pending(root, acked)
    for i in range(3):
        # Raw objects get RCV-{NODE}-... serials, which sort before "WH-...".
        (root / f"old-tool-{i}.json").write_bytes(body(i, amount="1.00").encode())
    earlier = record(2, 1, node="aa-01", text=body(2, amount="2.00"))
    (root / "copied-from-aa.json").write_bytes(earlier.to_bytes())
    return {
        "douyin:0": acked[0].serial,
        "douyin:1": acked[1].serial,
        "douyin:2": earlier.serial,  # record against record: the lower serial
    }


async def test_an_acknowledged_order_beats_a_loose_raw_file_with_its_key(
    center: FakeCenter, tmp_path: Path
):
    root = tmp_path / "buf"
    winners = _buffer(root)
    dry = tmp_path / "dry.json"
    run = await recover(
        "--path", str(root), "--mode", "dry-run", "--target", center.url, "--report", str(dry)
    )
    assert run.code == 1, run.err  # conflicts are predicted
    assert f"target {center.url} (not a configured cluster): healthy at 127.0.0.2" in run.out
    predicted = {g["dedupe_key"]: g["winner"] for g in report(dry)["duplicate_groups"]}
    assert predicted == winners

    rep = tmp_path / "merge.json"
    run = await recover(*merge_args(root, center.url, "--report", str(rep)))
    assert run.code == 1, run.err
    assert center.duplicates() == {}
    entries = {e["serial"]: e for e in report(rep)["orders"]}
    for key, serial in winners.items():
        assert entries[serial]["outcome"] == "created", (key, entries[serial])
        sent = orjson.loads(center.orders[key][1])
        assert sent["channel_order_id"] == key.split(":")[1]
    # The agent's acknowledged bodies reached the center, not the loose files' ones.
    assert orjson.loads(center.orders["douyin:0"][1])["amount"] == "199.10"
    assert orjson.loads(center.orders["douyin:2"][1])["amount"] == "2.00"
    rejected = files(root, "rejected")
    assert {n for n in rejected if not n.endswith(".reason.json")} == {
        "old-tool-0.json",
        "old-tool-1.json",
        "old-tool-2.json",
        f"{record(2, 3, node='wh-sh-01').serial}.json",
    }
    assert files(root, "pending") == []
    assert files(root) == []
    # Every file left for review is named on screen, not only in the report.
    assert "4 files to review" in run.out
    for name in ("old-tool-0.json", "old-tool-1.json", "old-tool-2.json"):
        assert f"conflict: {name}: " in run.out
    assert (root / ".edge-recover.db").exists()  # conflicts left: kept for the rerun
