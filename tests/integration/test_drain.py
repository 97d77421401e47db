"""The drain: every answer of CONTRACT section 7, corrupt files, claims, start-up repair."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import orjson

from agent.spool.record import PendingRecord
from tests.support.fakes import FakeCenter
from tests.support.harness import (
    AS_NOBODY,
    AgentHandle,
    as_sudo_cp_leaves_it,
    order,
    wait_for,
    write_config,
)


async def _buffer_orders(agent: AgentHandle, n: int, prefix: str = "") -> dict[str, str]:
    out = {}
    for i in range(n):
        status, body = await agent.post(order(f"{prefix}{i}"))
        assert status == 202, body
        out[f"douyin:{prefix}{i}"] = body["serial"]
    return out


def _reason(agent: AgentHandle, serial: str) -> dict:
    return orjson.loads((agent.spool / "rejected" / f"{serial}.json.reason.json").read_bytes())


async def test_409_and_429_are_retried_until_created(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url)
    accepted = await _buffer_orders(agent, 3)
    await center.come_up()
    center.script.extend([409, 429, 408, 425])
    center.retry_after = "1"
    await wait_for(lambda: agent.files("pending") == [], 15, "drain past 409/429")
    assert center.created_keys() == set(accepted)
    assert center.duplicates() == {}
    assert agent.files("rejected") == []


async def test_500_and_timeouts_back_off_and_keep_the_file(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url)
    accepted = await _buffer_orders(agent, 2)
    await center.come_up()
    center.script.extend([500, 502, 504])
    await wait_for(lambda: agent.files("pending") == [], 15, "drain after 5xx")
    assert center.created_keys() == set(accepted)
    assert all(k in accepted for k in (r.key for r in center.received))


async def test_422_and_other_4xx_are_quarantined_with_reason(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"drain_concurrency": 1})
    accepted = await _buffer_orders(agent, 3)
    serials = list(accepted.values())
    await center.come_up()
    center.script.extend([422, 400])  # oldest first: order 0 conflicts, order 1 is refused
    await wait_for(lambda: agent.files("pending") == [], 10, "drain")
    assert agent.files("rejected") == sorted(
        [
            f"{serials[0]}.json",
            f"{serials[0]}.json.reason.json",
            f"{serials[1]}.json",
            f"{serials[1]}.json.reason.json",
        ]
    )
    assert _reason(agent, serials[0])["reason"] == "conflict"
    assert _reason(agent, serials[1])["status"] == 400
    # The quarantined file is the order, untouched.
    kept = PendingRecord.from_bytes((agent.spool / "rejected" / f"{serials[1]}.json").read_bytes())
    assert kept.dedupe_key == "douyin:1"
    status, found = await agent.get(f"/v1/orders/{serials[0]}")
    assert status == 200 and found["state"] == "rejected"
    assert center.created_keys() == {"douyin:2"}


async def test_corrupt_pending_file_is_quarantined_and_blocks_nothing(
    make_agent, center: FakeCenter
):
    await center.go_down()
    agent = await make_agent(center.url)
    accepted = await _buffer_orders(agent, 3)
    bad = agent.spool / "pending" / "AAA-corrupt.json"  # sorts first: must not block the rest
    bad.write_bytes(b'{"v":1,"serial":"AAA-corr')
    wrong = agent.spool / "pending" / "AAB-wrong.json"
    wrong.write_bytes(orjson.dumps({"v": 1, "serial": "AAB-wrong"}))
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "drain")
    assert center.created_keys() == set(accepted)
    rejected = agent.files("rejected")
    assert "AAA-corrupt.json" in rejected and "AAB-wrong.json" in rejected
    kept = (agent.spool / "rejected" / "AAA-corrupt.json").read_bytes()
    assert kept == b'{"v":1,"serial":"AAA-corr'
    assert "not JSON" in _reason(agent, "AAA-corrupt")["error"]


async def test_file_placed_in_pending_by_another_process_is_delivered(
    make_agent, center: FakeCenter
):
    agent = await make_agent(center.url, buffer={"scan_interval_s": 60})
    record = PendingRecord(
        "OTHER-20261101-000000001",
        "other",
        "2026-11-01T10:00:00+08:00",
        "jd",
        "jd:1",
        None,
        '{"channel_id":"jd","channel_order_id":"1"}',
    )
    tmp = agent.spool / "pending" / ".incoming.tmp"
    tmp.write_bytes(record.to_bytes())
    os.rename(tmp, agent.spool / "pending" / record.filename)
    # The periodic rescan is 60 s away: only the watch can make this quick.
    await wait_for(lambda: agent.files("merged") == [record.filename], 10, "watched delivery")
    assert center.orders["jd:1"][1] == record.raw_body


async def test_a_file_claimed_by_another_process_is_left_alone(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url)
    accepted = await _buffer_orders(agent, 2)
    held = agent.spool / "pending" / f"{accepted['douyin:0']}.json"
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as edge-recover would while delivering it
    try:
        await center.come_up()
        await wait_for(lambda: "douyin:1" in center.creates, 10, "the unclaimed order")
        start = time.monotonic()
        await wait_for(lambda: time.monotonic() - start > 1.5, 5, "a few drain passes")
        assert "douyin:0" not in center.creates
        assert held.exists()
    finally:
        os.close(fd)  # the holder "dies": its lock goes with it
    agent.service.drainer.kick()
    await wait_for(lambda: agent.files("pending") == [], 10, "drain after release")
    assert center.created_keys() == set(accepted)


async def test_crash_between_merged_copy_and_unlink_finishes_the_move(
    make_agent, center: FakeCenter, tmp_path: Path
):
    await center.go_down()
    agent = await make_agent(center.url)
    accepted = await _buffer_orders(agent, 1)
    serial = accepted["douyin:0"]
    name = f"{serial}.json"
    # Simulate the crash: merged/ copy written, pending/ file not yet removed.
    (agent.spool / "merged" / name).write_bytes((agent.spool / "pending" / name).read_bytes())
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "move finished")
    assert center.received == []  # already confirmed: not sent again
    assert agent.files("merged") == [name]


async def test_startup_indexes_pending_files_the_journal_missed(
    make_agent, center: FakeCenter, tmp_path: Path
):
    await center.go_down()
    spool = tmp_path / "spool" / "pending"
    spool.mkdir(parents=True)
    record = PendingRecord(
        "WH-TEST-01-20261125-000005000",
        "wh-test-01",
        "2026-11-25T10:00:00+08:00",
        "douyin",
        "douyin:lost-row",
        None,
        orjson.dumps(order("lost-row")).decode(),
    )
    (spool / record.filename).write_bytes(record.to_bytes())
    (spool / ".WH-TEST-01-20261125-000005001.json.tmp").write_bytes(b"half")
    agent = await make_agent(center.url)
    status, body = await agent.post(order("lost-row"))
    assert (status, body["serial"]) == (200, record.serial)
    status, body = await agent.post(order("fresh"))
    # Serials continue above anything on disk, even with an empty journal.
    assert status == 202 and body["serial"].endswith("000005001")
    assert sorted(agent.files("pending")) == [record.filename, f"{body['serial']}.json"]


async def test_pacing_holds_the_drain_rate(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"drain_rate_per_s": 20})
    await _buffer_orders(agent, 30)
    await center.come_up()
    start = time.monotonic()
    await wait_for(lambda: agent.files("pending") == [], 15, "paced drain")
    elapsed = time.monotonic() - start
    assert elapsed >= 29 / 20 * 0.9, f"30 orders at 20/s took only {elapsed:.2f}s"
    assert len(center.creates) == 30


async def test_file_torn_while_edge_recover_added_keys_is_still_delivered(
    make_agent, center: FakeCenter
):
    """edge-recover adds order_id in place before its rename; a crash can tear that tail."""
    await center.go_down()
    agent = await make_agent(center.url)
    accepted = await _buffer_orders(agent, 1)
    path = agent.spool / "pending" / f"{accepted['douyin:0']}.json"
    data = path.read_bytes()
    path.write_bytes(data.rstrip()[:-1] + b',"order_id":"OC0')  # torn mid-key
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "drain")
    assert agent.files("rejected") == []
    assert center.creates["douyin:0"] == 1


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the highest RSS the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


async def test_fifo_symlink_and_2gb_file_in_pending_are_moved_aside_unread(
    tmp_path: Path, center: FakeCenter, agent_process, http
):
    """None of these is a file the agent wrote: each goes to rejected/ with its reason,
    never read (no hang, no 2 GB in memory), a link's target never touched or delivered."""
    config = write_config(tmp_path, center.url)
    pending = tmp_path / "spool" / "pending"
    pending.mkdir(parents=True)
    os.mkfifo(pending / "AAA-fifo.json")
    with open(pending / "AAB-huge.json", "wb") as fh:
        fh.truncate(2 * 1024**3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    theirs = PendingRecord(
        "OTHER-20261101-000000001",
        "other",
        "2026-11-01T10:00:00+08:00",
        "jd",
        "jd:linked",
        None,
        '{"channel_id":"jd","channel_order_id":"l"}',
    )
    target = elsewhere / theirs.filename
    target.write_bytes(theirs.to_bytes())
    os.chmod(target, 0o644)
    os.symlink(target, pending / "AAC-link.json")
    agent = agent_process(config)
    agent.start()
    await agent.wait_ready(http)
    async with http.post(f"{agent.url}/v1/orders", json=order("fine")) as r:
        assert r.status == 201
    rejected = tmp_path / "spool" / "rejected"
    names = ("AAA-fifo.json", "AAB-huge.json", "AAC-link.json")
    await wait_for(
        lambda: all((rejected / f"{n}.reason.json").exists() for n in names),
        10,
        "all three moved aside",
    )
    reasons = {
        n: orjson.loads((rejected / f"{n}.reason.json").read_bytes())["reason"] for n in names
    }
    assert reasons == {
        "AAA-fifo.json": "not_a_regular_file",
        "AAB-huge.json": "too_large",
        "AAC-link.json": "not_a_regular_file",
    }
    assert stat.S_ISFIFO(os.lstat(rejected / "AAA-fifo.json").st_mode)
    assert (rejected / "AAB-huge.json").stat().st_size == 2 * 1024**3
    assert os.readlink(rejected / "AAC-link.json") == str(target)
    assert target.read_bytes() == theirs.to_bytes()  # never changed, never delivered
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert "jd:linked" not in center.creates and center.created_keys() == {"douyin:fine"}
    assert os.listdir(pending) == []
    assert _peak_rss_mb(agent.proc.pid) < 200
    agent.kill(signal.SIGTERM)
    assert await agent.reap(timeout=8) == 0, agent.log_tail()


async def test_a_pending_file_the_agent_cannot_read_stays_and_the_rest_drain(
    shared_dir: Path, center: FakeCenter, agent_process, http
):
    """The agent runs as its own user; a root-owned 0600 file (sudo cp) in pending/ is
    left where it is with one clear log line; the others are delivered."""
    config = write_config(shared_dir, center.url, buffer={"scan_interval_s": 0.2})
    pending = shared_dir / "spool" / "pending"
    pending.mkdir(parents=True)
    recs = [
        PendingRecord(
            f"OTHER-20261101-00000000{i}",
            "other",
            "2026-11-01T10:00:00+08:00",
            "jd",
            f"jd:{i}",
            None,
            f'{{"channel_id":"jd","channel_order_id":"{i}"}}',
        )
        for i in range(1, 4)
    ]
    for r in recs:
        (pending / r.filename).write_bytes(r.to_bytes())
    subprocess.run(["chown", "-R", "nobody:nogroup", str(shared_dir)], check=True)
    locked = pending / recs[0].filename  # the oldest: met first by every pass
    as_sudo_cp_leaves_it(locked)
    agent = agent_process(config, prefix=AS_NOBODY)
    agent.start()
    await agent.wait_ready(http)
    merged = shared_dir / "spool" / "merged"
    await wait_for(
        lambda: sorted(os.listdir(merged)) == [r.filename for r in recs[1:]],
        10,
        "the readable files delivered",
    )
    await wait_for(
        lambda: "pending file not delivered" in agent.log_tail(20_000), 5, "the log line"
    )
    assert os.listdir(pending) == [recs[0].filename]
    assert locked.read_bytes() == recs[0].to_bytes()
    assert center.created_keys() == {"jd:2", "jd:3"}
    passes = lambda: agent.log_tail(50_000).count("drain pass: 1 pending")  # noqa: E731
    await wait_for(lambda: passes() >= 3, 10, "more passes over the unreadable file")
    agent.kill(signal.SIGTERM)
    assert await agent.reap(timeout=8) == 0, agent.log_tail()
    log = agent.log_tail(50_000)
    assert "Traceback" not in log and "drain failed" not in log
    assert log.count("pending file not delivered") == 1
    assert "Permission denied" in log
