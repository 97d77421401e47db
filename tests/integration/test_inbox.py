"""The inbox drop zone: treated exactly like POST /v1/orders."""

from __future__ import annotations

import os
import signal
import stat

import orjson

from tests.support.fakes import FakeCenter
from tests.support.harness import order, wait_for, write_config


def _drop(inbox, name: str, data: bytes, mode: int = 0o600) -> None:
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.rename(tmp, inbox / name)


async def test_dropped_order_is_buffered_with_a_serial(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"scan_interval_s": 60})
    raw = orjson.dumps(order("inbox-1", customer_phone="13900001111"))
    _drop(agent.spool / "inbox", "from-erp-1.json", raw)
    await wait_for(lambda: agent.files("inbox") == [], 10, "inbox pick-up")
    (name,) = agent.files("pending")
    record = orjson.loads((agent.spool / "pending" / name).read_bytes())
    assert record["body"].encode() == raw and record["dedupe_key"] == "douyin:inbox-1"
    status, found = await agent.get("/v1/orders/by-key/douyin:inbox-1")
    assert status == 200 and found["state"] == "buffered" and f"{found['serial']}.json" == name


async def test_dropped_order_is_forwarded_when_center_is_up(make_agent, center: FakeCenter):
    agent = await make_agent(center.url, buffer={"scan_interval_s": 60})
    raw = orjson.dumps(order("inbox-2"))
    _drop(agent.spool / "inbox", "o2.json", raw)
    await wait_for(lambda: "douyin:inbox-2" in center.creates, 10, "forward")
    assert center.orders["douyin:inbox-2"][1] == raw
    await wait_for(lambda: agent.files("inbox") == [], 5, "inbox cleared")
    # The same order dropped again is a duplicate: accepted, not created twice.
    _drop(agent.spool / "inbox", "o2-again.json", raw)
    await wait_for(lambda: agent.files("inbox") == [], 10, "duplicate cleared")
    assert center.creates["douyin:inbox-2"] == 1


async def test_invalid_drop_goes_to_rejected_with_the_400_reason(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"scan_interval_s": 60})
    _drop(agent.spool / "inbox", "bad.json", b'{"channel_id": "douyin"}', mode=0o644)
    _drop(agent.spool / "inbox", "garbage.json", b"\x00\x01 not json")
    await wait_for(lambda: agent.files("inbox") == [], 10, "inbox pick-up")
    assert agent.files("rejected") == [
        "bad.json",
        "bad.json.reason.json",
        "garbage.json",
        "garbage.json.reason.json",
    ]
    assert stat.S_IMODE(os.stat(agent.spool / "rejected" / "bad.json").st_mode) == 0o600
    reason = orjson.loads((agent.spool / "rejected" / "bad.json.reason.json").read_bytes())
    assert reason["status"] == 400 and reason["field"] == "channel_order_id"
    assert (agent.spool / "rejected" / "garbage.json").read_bytes() == b"\x00\x01 not json"
    assert agent.files("pending") == []


async def test_files_still_being_written_are_ignored(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"scan_interval_s": 0.2})
    inbox = agent.spool / "inbox"
    (inbox / ".partial.json").write_bytes(b'{"channel_id": "dou')
    (inbox / "upload.json.tmp").write_bytes(b'{"channel_id": "dou')
    _drop(inbox, "done.json", orjson.dumps(order("done")))
    await wait_for(lambda: "done.json" not in agent.files("inbox"), 10, "the finished file")
    seen = agent.service.inbox.scans
    await wait_for(lambda: agent.service.inbox.scans >= seen + 2, 5, "two more scans")
    assert sorted(os.listdir(agent.spool / "inbox")) == [".partial.json", "upload.json.tmp"]
    assert agent.files("rejected") == []
    assert len(agent.files("pending")) == 1


async def test_a_fifo_in_the_inbox_blocks_nothing_and_sigterm_still_ends_the_agent(
    tmp_path, center: FakeCenter, agent_process, http
):
    """mkfifo inbox/x.json: never opened for reading, moved aside; the next drop is taken."""
    config = write_config(tmp_path, center.url, buffer={"scan_interval_s": 0.5})
    inbox = tmp_path / "spool" / "inbox"
    agent = agent_process(config)
    agent.start()
    await agent.wait_ready(http)
    os.mkfifo(inbox / "x.json")
    _drop(inbox, "real.json", orjson.dumps(order("after-fifo")))

    async def found() -> bool:
        async with http.get(f"{agent.url}/v1/orders/by-key/douyin:after-fifo") as r:
            return r.status == 200

    await wait_for(found, 10, "the order dropped after the FIFO")
    assert center.creates["douyin:after-fifo"] == 1
    rejected = tmp_path / "spool" / "rejected"
    await wait_for(lambda: (rejected / "x.json.reason.json").exists(), 10, "FIFO moved aside")
    assert stat.S_ISFIFO(os.lstat(rejected / "x.json").st_mode)
    reason = orjson.loads((rejected / "x.json.reason.json").read_bytes())
    assert reason["reason"] == "not_a_regular_file" and "a FIFO" in reason["error"]
    # The lookup answers once the journal has the order; the inbox file goes after the
    # order's 2xx (agent/intake/inbox.py), a moment later on a loaded machine.
    await wait_for(lambda: os.listdir(inbox) == [], 10, "real.json taken from the inbox")
    agent.kill(signal.SIGTERM)
    assert await agent.reap(timeout=5 + 3) == 0, agent.log_tail()  # shutdown_timeout_s 5
