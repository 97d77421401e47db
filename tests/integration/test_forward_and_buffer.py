"""The two ways an order is acknowledged: created upstream (201) or durable on disk (202)."""

from __future__ import annotations

import os
import stat
from datetime import datetime

import orjson

from tests.support.fakes import FakeCenter
from tests.support.harness import order, wait_for


async def test_forward_is_byte_exact_and_carries_the_key(make_agent, center: FakeCenter):
    agent = await make_agent(center.url)
    raw = (
        b'{"channel_id":"douyin","channel_order_id":"6912345",  "amount":199.10,"x":"\xe8\xae\xa2"}'
    )
    status, body = await agent.post(raw)
    assert status == 201, body
    assert body["status"] == "forwarded" and body["cluster"] == "primary"
    assert body["order_id"] == center.orders["douyin:6912345"][0]
    sent = center.received[-1]
    assert sent.body == raw  # spacing, the number 199.10 and UTF-8 untouched
    assert sent.key == "douyin:6912345"
    assert sent.headers["X-Edge-Serial"] == body["serial"]
    assert sent.headers["X-Edge-Node"] == "wh-test-01"
    assert sent.headers["Content-Type"] == "application/json"
    assert agent.files("pending") == []
    status, looked_up = await agent.get(f"/v1/orders/{body['serial']}")
    assert status == 200 and looked_up["state"] == "forwarded"
    assert looked_up["order_id"] == body["order_id"]


async def test_idempotency_key_header_is_the_dedupe_key(make_agent, center: FakeCenter):
    agent = await make_agent(center.url)
    status, body = await agent.post(order(1), headers={"Idempotency-Key": "shop-77"})
    assert status == 201
    assert center.received[-1].key == "shop-77"
    status, again = await agent.post(order(1), headers={"Idempotency-Key": "shop-77"})
    assert (status, again) == (200, {"status": "duplicate", "serial": body["serial"]})
    status, found = await agent.get("/v1/orders/by-key/shop-77")
    assert status == 200 and found["serial"] == body["serial"]


async def test_duplicate_and_conflict_when_forwarded(make_agent, center: FakeCenter):
    agent = await make_agent(center.url)
    first_status, first = await agent.post(order(7))
    assert first_status == 201
    status, body = await agent.post(order(7))
    assert (status, body) == (200, {"status": "duplicate", "serial": first["serial"]})
    status, body = await agent.post(order(7, amount="1.00"))
    assert status == 422 and body["serial"] == first["serial"]
    assert center.creates["douyin:7"] == 1
    assert len(center.received) == 1  # neither repeat reached the center


async def test_center_down_buffers_durably_with_contract_fields(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url)
    raw = orjson.dumps(order(42, customer_phone="13812345678", note="包邮"))
    status, body = await agent.post(raw)
    assert status == 202, body
    assert body == {"status": "buffered", "serial": body["serial"], "sms": "queued"}
    name = f"{body['serial']}.json"
    assert agent.files("pending") == [name]
    path = agent.spool / "pending" / name
    record = orjson.loads(path.read_bytes())
    assert record["v"] == 1
    assert record["serial"] == body["serial"]
    assert record["node_id"] == "wh-test-01"
    assert datetime.fromisoformat(record["received_at"]).utcoffset() is not None
    assert record["channel_id"] == "douyin"
    assert record["dedupe_key"] == "douyin:42"
    assert record["customer_phone"] == "13812345678"
    assert record["body"].encode() == raw
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for sub in ("", "pending", "inbox", "merged", "rejected"):
        assert stat.S_IMODE(os.stat(agent.spool / sub).st_mode) == 0o700, sub
    status, found = await agent.get("/v1/orders/by-key/douyin%3A42")
    assert status == 200 and found["state"] == "buffered" and found["serial"] == body["serial"]


async def test_drain_after_center_returns_then_duplicates_in_each_state(
    make_agent, center: FakeCenter
):
    await center.go_down()
    agent = await make_agent(center.url)
    accepted = {}
    for n in range(20):
        status, body = await agent.post(order(n))
        assert status == 202
        accepted[f"douyin:{n}"] = body["serial"]
    # Buffered state: a repeat is a duplicate with the first serial.
    status, body = await agent.post(order(3))
    assert (status, body["serial"]) == (200, accepted["douyin:3"])

    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "pending/ to drain")
    assert center.created_keys() == set(accepted)
    assert center.duplicates() == {}
    assert len(agent.files("merged")) == 20
    merged = orjson.loads((agent.spool / "merged" / f"{accepted['douyin:5']}.json").read_bytes())
    assert merged["order_id"] == center.orders["douyin:5"][0]
    status, found = await agent.get(f"/v1/orders/{accepted['douyin:5']}")
    assert found["state"] == "merged" and found["order_id"] == merged["order_id"]
    # Merged state: still a duplicate, still not sent again.
    before = len(center.received)
    status, body = await agent.post(order(5))
    assert (status, body["serial"]) == (200, accepted["douyin:5"])
    assert len(center.received) == before
