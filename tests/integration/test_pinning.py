"""Each order remembers which cluster may hold it (issue 11, CONTRACT 5).

The two clusters keep SEPARATE idempotency stores (two FakeCenters): an order
sent to both is created twice, so every test ends by counting creates per key
across both. Late answers, 500, 409 and crash-cut sends at each cluster.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.fakes import FakeCenter
from tests.support.harness import AgentHandle, order, wait_for, write_config

HEALTH = {"interval_s": 0.1, "timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 1}


def once_across(primary: FakeCenter, standby: FakeCenter, keys: set[str]) -> dict[str, str]:
    """Every key created exactly once across both clusters; key -> the cluster holding it."""
    where = {}
    for key in keys:
        counts = {"primary": primary.creates[key], "standby": standby.creates[key]}
        assert sum(counts.values()) == 1, f"{key}: {counts}"
        where[key] = next(name for name, n in counts.items() if n)
    return where


def pinned_of(agent: AgentHandle, serial: str) -> Any:
    return orjson.loads((agent.spool / "pending" / f"{serial}.json").read_bytes())["pinned_to"]


async def _agent(make_agent, primary: FakeCenter, standby: FakeCenter, **kw) -> AgentHandle:
    return await make_agent(
        primary.url, upstream={"standby": standby.url, "timeout_s": 1.0}, health=HEALTH, **kw
    )


async def _mode(agent: AgentHandle) -> str:
    return (await agent.get("/status"))[1]["mode"]


@pytest.mark.parametrize("fault", ["late", "500", "409", "200 without order_id"])
async def test_an_unclear_answer_from_the_standby_pins_the_order_to_it(
    make_agent, center: FakeCenter, standby: FakeCenter, fault: str
):
    agent = await _agent(make_agent, center, standby)
    await center.go_down()
    await wait_for(lambda: _mode_is(agent, "standby"), 5, "standby mode")
    if fault == "late":
        standby.late_s = 1.5  # creates it, answers after upstream.timeout_s
    else:
        standby.after_create.append(int(fault.split()[0]))
    status, body = await agent.post(order("pin-sby"))
    assert status == 202, body  # not created as far as the agent knows: buffered
    serial = body["serial"]
    assert standby.creates["douyin:pin-sby"] == 1
    status, found = await agent.get(f"/v1/orders/{serial}")
    assert (found["state"], found["pinned_to"]) == ("buffered", "standby")
    standby.late_s = 0.0
    await standby.go_down()  # the standby leaves, the primary comes back
    await center.come_up()
    await wait_for(lambda: _mode_is(agent, "normal"), 5, "normal mode")
    drained_before = agent.service.drainer.passes
    await wait_for(lambda: agent.service.drainer.passes >= drained_before + 2, 10, "passes")
    assert agent.files("pending") == [f"{serial}.json"]  # waits for its cluster
    assert center.sends()["douyin:pin-sby"] == 0
    status_doc = (await agent.get("/status"))[1]
    assert status_doc["pinned"]["standby"] == 1
    assert 'edge_pending_pinned{cluster="standby"} 1.0' in (await agent.get("/metrics"))[1]
    await standby.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "drain to the standby")
    assert once_across(center, standby, {"douyin:pin-sby"}) == {"douyin:pin-sby": "standby"}
    status, found = await agent.get(f"/v1/orders/{serial}")
    assert (found["state"], found["cluster"]) == ("merged", "standby")


def _mode_is(agent: AgentHandle, mode: str) -> bool:
    return agent.service.mode() == mode


async def test_an_unclear_answer_from_the_primary_pins_to_the_primary(
    make_agent, center: FakeCenter, standby: FakeCenter
):
    agent = await _agent(make_agent, center, standby)
    center.after_create.append(502)
    status, body = await agent.post(order("pin-pri"))
    assert status == 202, body
    assert pinned_of(agent, body["serial"]) == "primary"
    await center.go_down()  # a long primary outage; the standby is healthy
    status, other = await agent.post(order("free"))
    assert (status, other["cluster"]) == (201, "standby")
    passes = agent.service.drainer.passes
    await wait_for(lambda: agent.service.drainer.passes >= passes + 2, 10, "drain passes")
    assert agent.files("pending") == [f"{body['serial']}.json"]
    assert standby.sends()["douyin:pin-pri"] == 0
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "drain to the primary")
    once_across(center, standby, {"douyin:pin-pri", "douyin:free"})


async def test_a_long_primary_outage_drains_unpinned_orders_to_the_standby(
    make_agent, center: FakeCenter, standby: FakeCenter
):
    agent = await _agent(make_agent, center, standby)
    center.late_s = 1.5  # the first order may be created at the primary: pinned there
    status, body = await agent.post(order("held"))
    assert status == 202
    center.late_s = 0.0
    await center.go_down()
    await standby.go_down()
    await wait_for(lambda: _mode_is(agent, "offline"), 5, "offline")
    keys = set()
    for i in range(20):  # every attempt refused: no cluster can hold these
        status, reply = await agent.post(order(f"out-{i}"))
        assert status == 202
        assert pinned_of(agent, reply["serial"]) is None
        keys.add(f"douyin:out-{i}")
    await standby.come_up()
    await wait_for(lambda: len(agent.files("pending")) == 1, 15, "unpinned to the standby")
    assert pinned_of(agent, body["serial"]) == "primary"
    assert all(standby.creates[k] == 1 for k in keys)
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "the pinned one to the primary")
    where = once_across(center, standby, keys | {"douyin:held"})
    assert where["douyin:held"] == "primary"


async def test_the_primary_back_does_not_take_orders_pinned_to_the_standby(
    make_agent, center: FakeCenter, standby: FakeCenter
):
    agent = await _agent(make_agent, center, standby)
    await center.go_down()
    await wait_for(lambda: _mode_is(agent, "standby"), 5, "standby")
    standby.script.extend([500, 500, 500])  # unclear: the standby may hold them: pinned
    serials = []
    for i in range(3):
        status, body = await agent.post(order(f"sb-{i}"))
        assert status == 202
        serials.append(body["serial"])
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "pinned orders to the standby")
    keys = {f"douyin:sb-{i}" for i in range(3)}
    assert set(once_across(center, standby, keys).values()) == {"standby"}
    assert all(center.sends()[k] == 0 for k in keys)


# -- crash-cut sends: kill -9 while the request is at a cluster -------------------------


async def _post(http, url: str, raw: bytes) -> tuple[int | None, dict[str, Any]]:
    try:
        async with http.post(
            f"{url}/v1/orders", data=raw, headers={"Content-Type": "application/json"}
        ) as r:
            return r.status, orjson.loads(await r.read())
    except Exception as exc:
        return None, {"error": repr(exc)}


async def test_a_503_failover_then_kill9_retries_only_at_the_standby(
    tmp_path: Path, center: FakeCenter, standby: FakeCenter, agent_process, http
):
    config = write_config(
        tmp_path, center.url, health=HEALTH, upstream={"standby": standby.url, "timeout_s": 5}
    )
    agent = agent_process(config)
    agent.start()
    await agent.wait_ready(http)
    center.script.append(503)  # a clear refusal: the same request fails over
    standby.late_s = 3.0  # the standby creates it, the answer is slow
    raw = orjson.dumps(order("fo-k9"))
    pending = asyncio.create_task(_post(http, agent.url, raw))
    await wait_for(lambda: standby.creates["douyin:fo-k9"] == 1, 10, "created at the standby")
    agent.kill()  # before the answer reaches the channel
    await agent.reap()
    assert (await pending)[0] is None
    standby.late_s = 0.0
    agent.start()
    await agent.wait_ready(http)
    status, body = await _post(http, agent.url, raw)  # the channel retries
    # The standby holds it under the serial of the cut send: a retry of an accepted order.
    assert (status, body.get("status")) == (200, "duplicate"), body
    assert standby.received[-1].headers["X-Edge-Serial"] == body["serial"]
    async with http.get(f"{agent.url}/v1/orders/by-key/douyin:fo-k9") as r:
        found = orjson.loads(await r.read())
    assert (found["serial"], found["state"], found["cluster"]) == (
        body["serial"],
        "forwarded",
        "standby",
    )
    assert found["order_id"] == standby.orders["douyin:fo-k9"][0]
    assert once_across(center, standby, {"douyin:fo-k9"}) == {"douyin:fo-k9": "standby"}


async def test_a_drain_send_cut_by_kill9_is_not_sent_to_the_other_cluster(
    tmp_path: Path, center: FakeCenter, standby: FakeCenter, agent_process, http
):
    config = write_config(
        tmp_path, center.url, health=HEALTH, upstream={"standby": standby.url, "timeout_s": 5}
    )
    agent = agent_process(config)
    await center.go_down()
    await standby.go_down()
    agent.start()
    await agent.wait_ready(http)
    raw = orjson.dumps(order("drain-k9"))
    status, body = await _post(http, agent.url, raw)
    assert status == 202
    center.late_s = 3.0  # the drain's request creates it; the answer never comes
    await center.come_up()
    center.late_s = 3.0
    await wait_for(lambda: center.creates["douyin:drain-k9"] == 1, 10, "drained to primary")
    agent.kill()
    await agent.reap()
    await center.go_down()  # now only the standby is there
    center.late_s = 0.0
    await standby.come_up()
    agent.start()
    await agent.wait_ready(http)
    passes_seen = 0

    async def status_pinned() -> bool:
        nonlocal passes_seen
        async with http.get(f"{agent.url}/v1/orders/{body['serial']}") as r:
            doc = orjson.loads(await r.read())
        passes_seen += 1
        return doc["pinned_to"] == "primary" and passes_seen > 20

    await wait_for(status_pinned, 10, "the order pinned to the primary, waiting")
    assert standby.sends()["douyin:drain-k9"] == 0
    await center.come_up()
    await wait_for(
        lambda: not (tmp_path / "spool" / "pending" / f"{body['serial']}.json").exists(),
        10,
        "delivered",
    )
    assert once_across(center, standby, {"douyin:drain-k9"}) == {"douyin:drain-k9": "primary"}
