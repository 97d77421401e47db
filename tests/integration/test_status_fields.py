"""/status and /metrics additions of issue 21: rejected/ count, version, per-cluster up,
build info, and no prometheus-client ``*_created`` series."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from agent import __version__
from agent.spool import rejected as rejected_mod
from agent.spool.record import BufferDirs
from agent.spool.rejected import RejectedCount
from tests.support.fakes import FakeCenter
from tests.support.harness import wait_for


def _drop(inbox: Path, name: str, data: bytes) -> None:
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, inbox / name)


async def test_rejected_count_lists_the_directory_only_when_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = BufferDirs(tmp_path)
    dirs.ensure()
    listings = []
    real = rejected_mod.count_rejected

    def counting(d: BufferDirs) -> int:
        listings.append(1)
        return real(d)

    monkeypatch.setattr(rejected_mod, "count_rejected", counting)
    counter = RejectedCount(dirs, interval_s=3600)
    await counter.refresh()
    assert counter.count == 0 and len(listings) == 1
    for _ in range(5):  # nothing changed: a stat each, no listing
        await counter.refresh()
    assert len(listings) == 1
    (dirs.rejected / "WH1-20261203-000000001.json").write_bytes(b"{}")
    (dirs.rejected / "WH1-20261203-000000001.json.reason.json").write_bytes(b"{}")
    (dirs.rejected / ".WH1-20261203-000000002.json.tmp").write_bytes(b"")
    # mtime granularity: make sure the directory's time moved even on a coarse clock
    st = os.stat(dirs.rejected)
    os.utime(dirs.rejected, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    await counter.refresh()
    assert counter.count == 1 and len(listings) == 2  # reason and temp files are no orders


async def test_rejected_count_waits_longer_after_a_slow_listing(tmp_path: Path) -> None:
    dirs = BufferDirs(tmp_path)
    dirs.ensure()
    clock = iter([100.0, 103.0])  # a listing of 3 s (a huge rejected/)
    counter = RejectedCount(dirs, interval_s=5, clock=lambda: next(clock))
    assert counter.next_wait() == 5
    await counter.refresh()
    assert counter.next_wait() == 30  # a listing takes at most a tenth of the time


async def test_status_and_metrics_show_rejected_files_version_and_clusters(
    make_agent, center: FakeCenter
) -> None:
    agent = await make_agent(center.url)
    _, st = await agent.get("/status")
    assert st["rejected"] == 0
    assert st["version"] == __version__
    _drop(agent.spool / "inbox", "garbage.json", b"\x00\x01 not json")
    await wait_for(lambda: agent.files("rejected"), 10, "the inbox file in rejected/")

    async def counted() -> dict | None:
        _, s = await agent.get("/status")
        return s if s["rejected"] == 1 else None

    # The timer (every 5 s) notices the move; no request lists the directory.
    await wait_for(counted, 15, "/status rejected == 1")
    _, text = await agent.get("/metrics")
    assert "edge_rejected_files 1.0" in text
    assert f'edge_build_info{{version="{__version__}"}} 1.0' in text
    assert 'edge_cluster_up{cluster="primary"} 1.0' in text
    await center.go_down()

    async def primary_down() -> bool:
        _, t = await agent.get("/metrics")
        return 'edge_cluster_up{cluster="primary"} 0.0' in t

    await wait_for(primary_down, 15, "edge_cluster_up 0 for the primary")


async def test_metrics_have_no_created_series(make_agent, center: FakeCenter) -> None:
    agent = await make_agent(center.url)
    assert (await agent.post(b'{"channel_id":"douyin","channel_order_id":"1"}'))[0] == 201
    _, text = await agent.get("/metrics")
    assert "edge_orders_total" in text and "edge_delivery_latency_seconds_bucket" in text
    created = [line for line in text.splitlines() if "_created" in line]
    assert created == [], created


async def test_chain_problems_list_the_failed_orders_with_both_values(
    make_agent, center: FakeCenter, tmp_path: Path
) -> None:
    """GET /v1/chain/problems: what the console lists under "After the outage"."""
    from tests.integration.test_chain import outage
    from tests.support.chain_fakes import Downstream, chain_section

    tokens = tmp_path / "tokens"
    tokens.write_text("cs-token\n")
    ds = await Downstream(center=center).start()
    try:
        ds.invoice_all = True
        agent = await make_agent(
            center.url, chain=chain_section(ds), auth={"tokens_file": str(tokens)}
        )
        agent.session.headers["Authorization"] = "Bearer cs-token"
        bodies = [
            orjson.dumps({"channel_id": "douyin", "channel_order_id": str(n), "total_amount": a})
            for n, a in ((1, "199.10"), (2, "199.10"))
        ]
        ds.amount_override["2"] = "199"
        serials = await outage(agent, center, bodies)

        async def problems() -> dict | None:
            _, doc = await agent.get("/v1/chain/problems")
            return doc if doc["problems"] else None

        doc = await wait_for(problems, 15, "the truncated amount listed")
        (row,) = doc["problems"]
        assert row["serial"] == serials[1] and row["step"] == "finance"
        assert row["state"] == "failed" and doc["more"] is False
        assert row["detail"] == '/amount is "199" downstream, expected "199.10"'
        assert row["order_id"] == center.orders["douyin:2"][0]
        del agent.session.headers["Authorization"]
        status, _ = await agent.get("/v1/chain/problems")
        assert status == 401  # it names orders: behind the token like the lookups
    finally:
        await ds.stop()


async def test_chain_problems_say_when_chain_is_off(make_agent, center: FakeCenter) -> None:
    agent = await make_agent(center.url)
    status, doc = await agent.get("/v1/chain/problems")
    assert status == 404 and "[chain] enabled" in doc["error"]
