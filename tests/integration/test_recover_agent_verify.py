"""edge-recover beside a running agent on one directory, and --mode verify."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.support.fakes import FakeCenter
from tests.support.harness import AgentFactory, wait_for
from tests.support.recover_helpers import (
    Recover,
    files,
    merge_args,
    record,
    recover,
    report,
    write_pending,
)


async def test_merge_beside_a_running_agent_delivers_each_order_once(
    make_agent: AgentFactory, center: FakeCenter, tmp_path: Path
):
    agent = await make_agent(center.url, buffer={"drain_rate_per_s": 2000, "drain_concurrency": 8})
    root = agent.spool
    center.delay_s = 0.005
    recs = [record(i, i + 1, node="wh-x") for i in range(1500)]
    rep = tmp_path / "r.json"
    proc = await Recover(
        *merge_args(str(root), center.url),
        "--batch",
        "10",
        "--concurrency",
        "4",
        "--report",
        str(rep),
    ).start()
    write_pending(root, recs)  # the agent's watch and the merge's scan race for them
    agent.service.drainer.kick()
    run = await proc.finish()
    assert run.code in (0, 1), run.err
    await wait_for(lambda: files(root, "pending") == [], 30, "pending/ drained by both")
    assert center.duplicates() == {}
    assert set(center.creates) == {r.dedupe_key for r in recs}
    assert files(root, "rejected") == []
    merged = files(root, "merged")
    assert merged == sorted(r.filename for r in recs)
    for name in merged:
        doc = orjson.loads((root / "merged" / name).read_bytes())
        assert doc["order_id"] == center.orders[doc["dedupe_key"]][0]
    outcomes = [e["outcome"] for e in report(rep)["orders"]]
    # Whatever the merge saw, it settled without a second create.
    assert set(outcomes) <= {"created", "duplicate", "by_agent", "pending"}


async def test_verify_finds_deleted_and_modified_orders(center: FakeCenter, tmp_path: Path):
    root = tmp_path / "buf"
    recs = [record(i, i + 1) for i in range(200)]
    write_pending(root, recs)
    run = await recover("--path", str(root), "--mode", "merge", "--target", center.url)
    assert run.code == 0, run.err
    run = await recover("--path", str(root), "--mode", "verify", "--target", center.url)
    assert run.code == 0, run.err
    assert "ok 200" in run.out
    # The center lost one order and altered another.
    del center.orders["douyin:17"]
    order_id, _ = center.orders["douyin:42"]
    center.orders["douyin:42"] = (order_id, b'{"channel_id":"douyin","channel_order_id":"42"}')
    rep = tmp_path / "verify.json"
    run = await recover(
        "--path", str(root), "--mode", "verify", "--target", center.url, "--report", str(rep)
    )
    assert run.code == 1
    problems = {p["dedupe_key"]: p for p in report(rep)["problems"]}
    assert set(problems) == {"douyin:17", "douyin:42"}
    assert problems["douyin:17"]["status"] == "missing"
    assert problems["douyin:42"]["status"] == "different"
    assert problems["douyin:17"]["serial"] == recs[17].serial
    assert report(rep)["summary"]["ok"] == 198
    assert "missing: merged/" in run.out and "douyin:17" in run.out
