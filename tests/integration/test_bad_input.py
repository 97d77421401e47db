"""Bad input gets a clear error (status and field) and never touches what was accepted."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest

from tests.support.fakes import FakeCenter
from tests.support.harness import AgentHandle, order, tmpfs


async def _accepted_baseline(agent: AgentHandle) -> dict[str, str]:
    """Buffer a few orders first; every test ends by checking they are untouched."""
    serials = {}
    for n in range(3):
        status, body = await agent.post(order(f"base-{n}"))
        assert status == 202
        serials[f"douyin:base-{n}"] = body["serial"]
    return serials


async def _assert_untouched(agent: AgentHandle, serials: dict[str, str]) -> None:
    pending = set(agent.files("pending"))
    for key, serial in serials.items():
        assert f"{serial}.json" in pending
        status, found = await agent.get(f"/v1/orders/{serial}")
        assert status == 200 and found["state"] == "buffered", key
    assert agent.files("rejected") == []


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", "body"),
        (b"", "body"),
        (b"[1, 2]", "body"),
        (b'"a string"', "body"),
        (b'{"channel_order_id": "1"}', "channel_id"),
        (b'{"channel_id": "douyin"}', "channel_order_id"),
        (b'{"channel_id": "  ", "channel_order_id": "1"}', "channel_id"),
        (b'{"channel_id": 5, "channel_order_id": "1"}', "channel_id"),
        (b'{"channel_id": "douyin", "channel_order_id": 12345}', "channel_order_id"),
        (b'{"channel_id": "douyin", "channel_order_id": null}', "channel_order_id"),
        (b'{"channel_id": "d", "channel_order_id": "1", "customer_phone": 138}', "customer_phone"),
        (b'{"channel_id": "d\\u0000x", "channel_order_id": "1"}', "channel_id"),
        (b'{"channel_id": "d", "channel_order_id": "1\\n2"}', "channel_order_id"),
        (b'{"channel_id": "d", "channel_order_id": "' + b"9" * 300 + b'"}', "channel_order_id"),
        (b'\xff\xfe{"channel_id": "d", "channel_order_id": "1"}', "body"),
    ],
)
async def test_invalid_body_is_400_naming_the_field(make_agent, center: FakeCenter, raw, field):
    await center.go_down()
    agent = await make_agent(center.url)
    baseline = await _accepted_baseline(agent)
    status, body = await agent.post(raw)
    assert status == 400, body
    assert body["field"] == field and body["error"]
    await _assert_untouched(agent, baseline)


async def test_blank_idempotency_key_is_400(make_agent, center: FakeCenter):
    agent = await make_agent(center.url)
    status, body = await agent.post(order(1), headers={"Idempotency-Key": "   "})
    assert (status, body["field"]) == (400, "Idempotency-Key")
    assert center.received == []


async def test_wrong_content_type_is_415_and_too_large_is_413(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, agent={"max_body_bytes": 2048})
    baseline = await _accepted_baseline(agent)
    url = f"{agent.url}/v1/orders"
    async with agent.session.post(
        url, data=orjson.dumps(order(9)), headers={"Content-Type": "text/plain"}
    ) as r:
        assert r.status == 415 and "error" in await r.json()
    async with agent.session.post(url, data=orjson.dumps(order(9))) as r:  # no content type
        assert r.status == 415
    big = orjson.dumps(order(10, pad="x" * 4096))
    status, body = await agent.post(big)
    assert status == 413 and "max_body_bytes" in body["error"]

    async def chunked():  # no Content-Length: the limit still holds while reading
        yield big[:1000]
        yield big[1000:]

    async with agent.session.post(
        url, data=chunked(), headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 413
    await _assert_untouched(agent, baseline)


async def test_tokens_file_enforces_bearer_auth(make_agent, center: FakeCenter, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# ops tokens\nsecret-one\n\nsecret-two\n")
    agent = await make_agent(center.url, auth={"tokens_file": str(tokens)})
    status, body = await agent.post(order(1))
    assert status == 401 and body["error"]
    status, _ = await agent.post(order(1), headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, _ = await agent.post(order(1), headers={"Authorization": "Basic secret-one"})
    assert status == 401
    async with agent.session.get(f"{agent.url}/v1/orders/by-key/douyin:1") as r:
        assert r.status == 401  # lookups carry customer data: same auth
    assert center.received == []
    status, body = await agent.post(order(1), headers={"Authorization": "Bearer secret-two"})
    assert status == 201
    async with agent.session.get(f"{agent.url}/healthz") as r:
        assert r.status == 200  # probes stay open


async def test_buffer_full_is_507_and_accepted_orders_stay(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"max_bytes": 1500})
    accepted = []
    status = 202
    while status == 202:
        status, body = await agent.post(order(len(accepted)))
        if status == 202:
            accepted.append(body["serial"])
    assert status == 507 and "max_bytes" in body["error"]
    assert 2 <= len(accepted) < 10
    assert sorted(agent.files("pending")) == sorted(f"{s}.json" for s in accepted)
    # Once the center is back and the buffer drains, orders are accepted again.
    await center.come_up()
    from tests.support.harness import wait_for

    await wait_for(lambda: agent.files("pending") == [], 10, "drain")
    status, _ = await agent.post(order("after"))
    assert status == 201
    assert center.created_keys() >= {f"douyin:{n}" for n in range(len(accepted))}


@pytest.fixture
def tiny_disk(tmp_path: Path):
    with tmpfs(tmp_path / "tiny") as mount:
        yield mount


async def test_disk_full_is_507_never_a_2xx(make_agent, center: FakeCenter, tiny_disk: Path):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"path": str(tiny_disk / "spool")})
    accepted, refused = [], []
    big = "x" * 3000
    for n in range(60):
        status, body = await agent.post(order(n, note=big))
        (accepted if status == 202 else refused).append((n, status, body))
    assert refused, "a 64 KiB disk should fill up"
    assert {s for _, s, _ in refused} == {507}, refused[:3]
    pending = agent.files("pending")
    assert sorted(pending) == sorted(f"{b['serial']}.json" for _, _, b in accepted)
    for name in pending:  # every acknowledged file is whole and parseable
        record = orjson.loads((agent.spool / "pending" / name).read_bytes())
        assert big in record["body"]
    assert not any(name.startswith(".") for name in os.listdir(agent.spool / "pending"))
    await asyncio.sleep(0)


async def test_shutting_down_answers_503(make_agent, center: FakeCenter):
    agent = await make_agent(center.url)
    agent.service.intake.accepting = False
    status, body = await agent.post(order(1))
    assert status == 503 and body["error"]
    assert center.received == []


async def test_keys_never_become_paths(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url)
    nasty = ["../../etc/passwd", "/abs/path", "a" * 250, "..", "con:aux", "订单/../x"]
    serials = []
    for i, value in enumerate(nasty):
        status, body = await agent.post(
            {"channel_id": value, "channel_order_id": value + str(i)},
            headers={"Idempotency-Key": f"{value}|{i}"},
        )
        assert status == 202, body
        serials.append(body["serial"])
    assert agent.files("pending") == sorted(f"{s}.json" for s in serials)
    visible = [n for n in os.listdir(agent.spool) if not n.startswith(".")]
    assert sorted(visible) == ["inbox", "merged", "pending", "rejected"]
    status, found = await agent.get("/v1/orders/by-key/..%2F..%2Fetc%2Fpasswd%7C0")
    assert status == 200 and found["serial"] == serials[0]


async def test_concurrent_repeats_of_one_key_create_once(make_agent, center: FakeCenter):
    center.delay_s = 0.3
    agent = await make_agent(center.url)
    results = await asyncio.gather(*(agent.post(order("same")) for _ in range(10)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(201) == 1
    assert set(statuses) <= {201, 200, 409}
    serial = next(b["serial"] for s, b in results if s == 201)
    for s, b in results:
        if s == 409:
            # The first request's serial, or null if it had none yet when the repeat came.
            assert b["serial"] in (serial, None) and "retry" in b["error"]
    assert center.creates["douyin:same"] == 1
    assert len(center.received) == 1


async def test_unknown_route_is_json_404(make_agent, center: FakeCenter):
    agent = await make_agent(center.url)
    status, body = await agent.get("/v1/orders/NOPE-20260101-000000001")
    assert status == 404 and body["error"]
    status, body = await agent.get("/nothing/here")
    assert status == 404 and body["error"]
