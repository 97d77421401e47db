"""SMS notices through the http provider: once per buffered order, retries, limits, skips.

Real agents (in-process) and a real gateway on 127.0.0.4; the order center is
down unless a test says otherwise, so orders are buffered.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from agent.spool.record import PendingRecord
from tests.support.fakes import FakeCenter, FakeSmsGateway
from tests.support.harness import AgentHandle, order, sms_http, wait_for

TEMPLATE = "【{sign_name}】您的订单已受理,单号{SN},预计2小时内同步至小程序"


async def _status(agent: AgentHandle) -> dict[str, Any]:
    status, doc = await agent.get("/status")
    assert status == 200
    return dict(doc)


async def _by_state(agent: AgentHandle) -> dict[str, int]:
    return dict((await _status(agent))["sms"]["by_state"])


async def _metric(agent: AgentHandle, name: str) -> float:
    _, text = await agent.get("/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _post_sent(agent: AgentHandle, gw: FakeSmsGateway, n: str, phone: str) -> str:
    """Buffer one more order and wait for its SMS: proves the sender moved past the rest."""
    status, body = await agent.post(order(n, customer_phone=phone))
    assert (status, body["sms"]) == (202, "queued"), body
    await wait_for(lambda: body["serial"] in gw.per_serial(), 10, f"SMS for {n}")
    return str(body["serial"])


async def test_one_sms_per_buffered_order_with_a_phone_none_for_forwarded(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway, tmp_path: Path
):
    sms_gateway.token = "gw-secret-token"
    cred = tmp_path / "sms.cred"
    cred.write_text("gw-secret-token\n")
    agent = await make_agent(center.url, sms=sms_http(sms_gateway, credentials_file=str(cred)))
    status, fwd = await agent.post(order("f1", customer_phone="13812345678"))
    assert status == 201 and "sms" not in fwd

    await center.go_down()
    serials = {}
    for n in range(5):
        status, body = await agent.post(order(f"b{n}", customer_phone=f"1390000{n:04d}"))
        assert status == 202 and body["sms"] == "queued", body
        serials[body["serial"]] = f"1390000{n:04d}"
    status, body = await agent.post(order("nophone"))
    assert status == 202 and body["sms"] == "none"

    await wait_for(lambda: len(sms_gateway.received) >= 5, 10, "5 SMS")
    await _post_sent(agent, sms_gateway, "last", "13700000000")
    counts = sms_gateway.per_serial()
    assert fwd["serial"] not in counts and body["serial"] not in counts
    assert {s: counts[s] for s in serials} == dict.fromkeys(serials, 1)
    for got in sms_gateway.received:
        if got.serial not in serials:
            continue
        assert got.doc == {
            "phone": serials[got.serial],
            "sign_name": "搭贝",
            "template": TEMPLATE,
            "params": {"SN": got.serial},
            "text": TEMPLATE.format(sign_name="搭贝", SN=got.serial),
        }
        assert got.headers["Idempotency-Key"] == got.serial
    doc = await _status(agent)
    assert doc["sms_outbox"] == 0
    assert doc["sms"]["provider"] == "http" and doc["sms"]["by_state"]["sent"] == 6
    assert await _metric(agent, "edge_sms_sent_total") == 6.0
    assert await _metric(agent, 'edge_sms_outbox{state="sent"}') == 6.0


async def test_invalid_phones_are_skipped_the_order_is_still_accepted(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway
):
    await center.go_down()
    agent = await make_agent(center.url, sms=sms_http(sms_gateway))
    skipped = []
    for n, phone in enumerate(
        ["12345", "1381234567", "12812345678", "+86 21 5555 1234", "call me"]
    ):
        status, body = await agent.post(order(f"bad{n}", customer_phone=phone))
        assert status == 202 and body["sms"] == "none", (phone, body)
        skipped.append(body["serial"])
    # Spaces, dashes and +86 are fine; other countries in E.164 too.
    ok_cn = await _post_sent(agent, sms_gateway, "ok-cn", "+86 138-1234-5678")
    ok_uk = await _post_sent(agent, sms_gateway, "ok-uk", "+447911123456")
    phones = {r.serial: r.phone for r in sms_gateway.received}
    assert phones == {ok_cn: "13812345678", ok_uk: "+447911123456"}
    assert (await _by_state(agent))["skipped"] == 5
    state, reason = await agent.service.outbox.store.state_of(skipped[0])
    assert state == "skipped" and "mainland mobile" in reason
    assert len(agent.files("pending")) == 7  # every order is kept


async def test_per_phone_limit_holds_across_a_restart(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway
):
    await center.go_down()
    sms = sms_http(sms_gateway, per_phone_per_hour=2)
    agent = await make_agent(center.url, sms=sms)
    answers = [
        (await agent.post(order(f"r{n}", customer_phone="13800000001")))[1]["sms"] for n in range(3)
    ]
    assert answers == ["queued", "queued", "none"]
    await wait_for(lambda: len(sms_gateway.received) == 2, 10, "2 SMS")
    assert (await _by_state(agent))["suppressed"] == 1
    await agent.service.stop()

    again = await make_agent(center.url, sms=sms)
    status, body = await again.post(order("r3", customer_phone="+8613800000001"))
    assert status == 202 and body["sms"] == "none"  # the window survived the restart
    await _post_sent(again, sms_gateway, "other", "13800000002")
    assert [r.phone for r in sms_gateway.received].count("13800000001") == 2
    by_state = await _by_state(again)
    assert by_state["suppressed"] == 2 and by_state["sent"] == 3
    assert len(again.files("pending")) == 5


async def test_gateway_down_then_up_delivers_each_once(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway
):
    await center.go_down()
    await sms_gateway.go_down()
    agent = await make_agent(center.url, sms=sms_http(sms_gateway))
    serials = []
    for n in range(3):
        status, body = await agent.post(order(f"d{n}", customer_phone=f"1360000000{n}"))
        assert (status, body["sms"]) == (202, "queued")
        serials.append(body["serial"])
    store = agent.service.outbox.store

    async def retried() -> bool:
        found = [await store.state_of(s) for s in serials]
        return all(f is not None and "cannot connect" in f[1] for f in found)

    await wait_for(retried, 10, "failed attempts recorded")
    assert (await _status(agent))["sms_outbox"] == 3
    await sms_gateway.come_up()
    await wait_for(lambda: len(sms_gateway.received) >= 3, 10, "delivery after recovery")
    await _post_sent(agent, sms_gateway, "after", "13600000009")
    assert all(sms_gateway.per_serial()[s] == 1 for s in serials)
    assert (await _status(agent))["sms_outbox"] == 0


async def test_transient_answers_are_retried_permanent_ones_are_not(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway
):
    await center.go_down()
    agent = await make_agent(center.url, sms=sms_http(sms_gateway, rate_limited_pause_s=0.3))
    sms_gateway.script.extend([503, 429])
    start = time.monotonic()
    first = await _post_sent(agent, sms_gateway, "t1", "13500000001")
    assert time.monotonic() - start >= 0.3  # a 429 waits rate_limited_pause_s
    sms_gateway.script.append(400)
    status, body = await agent.post(order("t2", customer_phone="13500000002"))
    assert (status, body["sms"]) == (202, "queued")

    async def failed() -> bool:
        return (await _by_state(agent))["failed"] == 1

    await wait_for(failed, 10, "the 400 to be final")
    await _post_sent(agent, sms_gateway, "t3", "13500000003")
    assert body["serial"] not in sms_gateway.per_serial()
    assert sms_gateway.per_serial()[first] == 1
    assert await _metric(agent, "edge_sms_failed_total") == 1.0
    _, reason = await agent.service.outbox.store.state_of(body["serial"])
    assert "HTTP 400" in reason


async def test_gives_up_after_the_configured_time(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway
):
    await center.go_down()
    await sms_gateway.go_down()
    agent = await make_agent(center.url, sms=sms_http(sms_gateway, give_up_after_s=0.5))
    status, body = await agent.post(order("g1", customer_phone="13400000001"))
    assert (status, body["sms"]) == (202, "queued")

    async def given_up() -> bool:
        return (await _by_state(agent))["failed"] == 1

    await wait_for(given_up, 10, "give up")
    assert (await _status(agent))["sms_outbox"] == 0
    assert await _metric(agent, "edge_sms_failed_total") == 1.0
    await sms_gateway.come_up()
    await _post_sent(agent, sms_gateway, "g2", "13400000002")
    assert body["serial"] not in sms_gateway.per_serial()


async def test_no_answer_is_ambiguous_and_never_resent(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway
):
    await center.go_down()
    agent = await make_agent(center.url, sms=sms_http(sms_gateway, timeout_s=0.3))
    sms_gateway.delay_s = 1.0
    status, body = await agent.post(order("a1", customer_phone="13300000001"))
    assert (status, body["sms"]) == (202, "queued")

    async def ambiguous() -> bool:
        return (await _by_state(agent))["ambiguous"] == 1

    await wait_for(ambiguous, 10, "ambiguous")
    sms_gateway.delay_s = 0
    await _post_sent(agent, sms_gateway, "a2", "13300000002")
    assert sms_gateway.per_serial()[body["serial"]] == 1  # the customer got exactly one


async def test_a_row_left_sending_by_a_crash_becomes_ambiguous_not_resent(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway, tmp_path: Path
):
    await center.go_down()
    await sms_gateway.go_down()
    agent = await make_agent(center.url, sms=sms_http(sms_gateway))
    status, body = await agent.post(order("c1", customer_phone="13200000001"))
    assert (status, body["sms"]) == (202, "queued")
    await agent.service.stop()
    # What kill -9 during the provider call leaves behind.
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite3") as db:
        db.execute("UPDATE sms SET state='sending' WHERE serial=?", (body["serial"],))
    await sms_gateway.come_up()
    again = await make_agent(center.url, sms=sms_http(sms_gateway))
    await _post_sent(again, sms_gateway, "c2", "13200000002")
    assert body["serial"] not in sms_gateway.per_serial()
    state, reason = await again.service.outbox.store.state_of(body["serial"])
    assert state == "ambiguous" and "not resent" in reason
    assert (await _by_state(again))["ambiguous"] == 1


async def test_pending_files_without_an_outbox_row_get_their_sms_at_start(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway, tmp_path: Path
):
    """A crash between the pending fsync and the outbox commit: the file wins."""
    await center.go_down()
    pending = tmp_path / "spool" / "pending"
    pending.mkdir(parents=True)

    def put(serial: str, phone: str | None, age_s: float = 0) -> None:
        rec = PendingRecord(
            serial,
            "wh-test-01",
            "2026-01-01T00:00:00+08:00",
            "douyin",
            f"douyin:{serial}",
            phone,
            orjson.dumps(order(serial, customer_phone=phone)).decode(),
        )
        path = pending / rec.filename
        path.write_bytes(rec.to_bytes())
        if age_s:
            os.utime(path, (time.time() - age_s, time.time() - age_s))

    put("WH-TEST-01-20260101-000000001", "13100000001")
    put("WH-TEST-01-20260101-000000002", None)
    put("WH-TEST-01-20260101-000000003", "13100000003", age_s=7200)  # too late for a notice
    agent = await make_agent(center.url, sms=sms_http(sms_gateway))
    await wait_for(lambda: sms_gateway.received, 10, "backfilled SMS")
    await _post_sent(agent, sms_gateway, "new", "13100000004")
    assert sorted(sms_gateway.per_serial().items())[0] == ("WH-TEST-01-20260101-000000001", 1)
    assert len(sms_gateway.received) == 2
    await agent.service.stop()
    again = await make_agent(center.url, sms=sms_http(sms_gateway))  # not backfilled twice
    await _post_sent(again, sms_gateway, "new2", "13100000005")
    assert len(sms_gateway.received) == 3


async def test_sms_disabled_answers_none_and_sends_nothing(
    make_agent, center: FakeCenter, sms_gateway: FakeSmsGateway
):
    await center.go_down()
    agent = await make_agent(center.url, sms=sms_http(sms_gateway, enabled=False))
    status, body = await agent.post(order("x", customer_phone="13000000001"))
    assert status == 202 and body["sms"] == "none"
    assert (await _status(agent))["sms_outbox"] == 0
    assert not (Path(agent.cfg.agent.state_dir) / "outbox.sqlite3").exists()


async def test_sms_settings_reload_live(make_agent, center, tmp_path):
    """A new [sms] section applies without a restart; turning it off stops new notices."""
    from agent.service.reload import ConfigReloader

    await center.go_down()
    agent = await make_agent(center.url)
    path = tmp_path / "agent.toml"
    reloader = ConfigReloader(str(path), lambda: agent.service.cfg, agent.service.apply_config)
    status, body = await agent.post(order_with_phone("r1"))
    assert (status, body["sms"]) == (202, "queued")
    text = path.read_text().replace("[sms]", "[sms]\nenabled = false")
    path.write_text(text)
    assert await reloader.reload_now() is True
    status, body = await agent.post(order_with_phone("r2"))
    assert (status, body["sms"]) == (202, "none")


def order_with_phone(n: str) -> dict:
    from tests.support.harness import order

    return order(n, customer_phone="13812345678")
