"""Failover between primary and standby, the ambiguity rule, DNS switches, DNS failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from agent.sandbox.dns_server import SandboxDns
from tests.support.fakes import FakeCenter
from tests.support.harness import AgentHandle, order, wait_for

HEALTH = {"interval_s": 0.1, "timeout_s": 0.3, "unhealthy_threshold": 3, "healthy_threshold": 2}


@pytest.fixture
async def dns() -> AsyncIterator[SandboxDns]:
    server = await SandboxDns(ttl=1).start()
    yield server
    await server.stop()


async def _agent(make_agent, primary: FakeCenter, standby: FakeCenter, **kw) -> AgentHandle:
    return await make_agent(
        primary.url, upstream={"standby": standby.url, "timeout_s": 1.0}, health=HEALTH, **kw
    )


def _mode(agent: AgentHandle) -> str:
    return agent.service.mode()


@pytest.mark.parametrize("failure", ["refuse", "503"])
async def test_primary_down_fails_over_then_back(
    make_agent, center: FakeCenter, standby: FakeCenter, failure: str
):
    agent = await _agent(make_agent, center, standby)
    status, body = await agent.post(order(1))
    assert (status, body["cluster"]) == (201, "primary")
    if failure == "refuse":
        await center.go_down()
    else:
        center.mode = "503"
    down_at = time.monotonic()
    # Unambiguous failures go to the standby within the same request, even before
    # the health checks have declared the primary down.
    status, body = await agent.post(order(2))
    assert (status, body["cluster"]) == (201, "standby"), body
    await wait_for(lambda: _mode(agent) == "standby", 5, "mode standby")
    detection = time.monotonic() - down_at
    assert detection <= 3 * 0.1 + 0.3 + 0.5, f"took {detection:.2f}s"
    status, body = await agent.post(order(3))
    assert (status, body["cluster"]) == (201, "standby")
    status, found = await agent.get(f"/v1/orders/{body['serial']}")
    assert found["cluster"] == "standby" and found["state"] == "forwarded"

    await center.come_up()
    await wait_for(lambda: _mode(agent) == "normal", 5, "failback")
    status, body = await agent.post(order(4))
    assert (status, body["cluster"]) == (201, "primary")
    assert center.created_keys() == {"douyin:1", "douyin:4"}
    assert standby.created_keys() == {"douyin:2", "douyin:3"}
    status, st = await agent.get("/status")
    assert st["clusters"]["primary"]["healthy"] and st["clusters"]["standby"]["healthy"]
    metrics = (await agent.get("/metrics"))[1]
    assert 'edge_mode_transitions_total{to="standby"} 1.0' in metrics
    assert "edge_failovers_total 1.0" in metrics


@pytest.mark.parametrize("how", ["timeout", "500", "502", "504"])
async def test_ambiguous_primary_answer_is_buffered_never_sent_to_standby(
    make_agent, center: FakeCenter, standby: FakeCenter, how: str
):
    agent = await _agent(make_agent, center, standby)
    if how == "timeout":
        center.delay_s = 2.0  # beyond upstream.timeout_s: sent, but no answer
    else:
        center.script.append(int(how))
    status, body = await agent.post(order("amb"))
    assert status == 202 and body["status"] == "buffered"
    assert standby.received == []
    center.delay_s = 0
    await wait_for(lambda: agent.files("pending") == [], 10, "drain to primary")
    assert center.creates["douyin:amb"] == 1
    assert standby.received == []


async def test_both_down_then_an_unpinned_order_drains_to_the_standby(
    make_agent, center: FakeCenter, standby: FakeCenter
):
    """Refused connections everywhere: no cluster can hold the order, so the standby,
    back first, may take it (buffer.drain_to_standby, default true)."""
    agent = await _agent(make_agent, center, standby)
    await center.go_down()
    await standby.go_down()
    await wait_for(lambda: _mode(agent) == "offline", 5, "offline")
    status, body = await agent.post(order(1))
    assert status == 202
    await standby.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "drain to the standby")
    assert standby.created_keys() == {"douyin:1"}
    await center.come_up()
    await wait_for(lambda: _mode(agent) == "normal", 5, "normal")
    status, body = await agent.post(order(1))
    assert (status, body["status"]) == (200, "duplicate")
    assert center.created_keys() == set()


async def test_without_drain_to_standby_buffered_orders_wait_for_the_primary(
    make_agent, center: FakeCenter, standby: FakeCenter
):
    agent = await make_agent(
        center.url,
        upstream={"standby": standby.url},
        buffer={"drain_to_standby": False},
        health=HEALTH,
    )
    await center.go_down()
    await standby.go_down()
    await wait_for(lambda: _mode(agent) == "offline", 5, "offline")
    status, body = await agent.post(order(1))
    assert status == 202
    await standby.come_up()
    await wait_for(lambda: _mode(agent) == "standby", 5, "standby")
    status, body = await agent.post(order(2))
    assert (status, body["cluster"]) == (201, "standby")
    assert agent.files("pending") != []  # buffered orders wait for the primary
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "drain")
    assert center.created_keys() == {"douyin:1"}
    assert standby.created_keys() == {"douyin:2"}


async def test_drain_starts_quickly_when_the_primary_is_back(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, buffer={"scan_interval_s": 30}, health=HEALTH)
    for n in range(5):
        assert (await agent.post(order(n)))[0] == 202
    await center.come_up()
    # The rescan is 30 s away: only the health transition can start the drain this soon
    # (bench/failover.py measures how soon).
    await wait_for(lambda: len(center.creates) > 0, 10, "first drained order")
    await wait_for(lambda: agent.files("pending") == [], 10, "drain")


async def test_flapping_primary_loses_and_duplicates_nothing(
    make_agent, center: FakeCenter, standby: FakeCenter
):
    agent = await _agent(make_agent, center, standby)
    acked: dict[str, int] = {}
    stop = asyncio.Event()

    flaps = 0

    async def flap() -> None:
        nonlocal flaps
        while not stop.is_set():
            center.mode = "503" if center.mode == "up" else "up"
            flaps += 1
            await asyncio.sleep(0.3)  # the flap period itself
        center.mode = "up"

    async def client(c: int) -> None:
        n = 0
        while not stop.is_set():
            key = f"{c}-{n}"
            status, _ = await agent.post(order(key))
            if 200 <= status < 300:
                acked[f"douyin:{key}"] = status
            n += 1

    flapper = asyncio.create_task(flap())
    clients = [asyncio.create_task(client(c)) for c in range(4)]
    # Load until enough orders were acknowledged across enough flaps of the primary.
    await wait_for(lambda: len(acked) >= 200 and flaps >= 12, 60, "load across 12 flaps")
    stop.set()
    await asyncio.gather(flapper, *clients)
    await wait_for(lambda: agent.files("pending") == [], 15, "drain after flapping")
    both = center.created_keys() & standby.created_keys()
    assert both == set(), f"created on both clusters: {sorted(both)[:5]}"
    assert center.duplicates() == {} and standby.duplicates() == {}
    created = center.created_keys() | standby.created_keys()
    assert set(acked) <= created
    transitions = agent.service.metrics.mode_transitions
    total = sum(
        s.value for m in transitions.collect() for s in m.samples if s.name.endswith("_total")
    )
    assert total <= 2 * 5 / 0.3 + 2  # hysteresis: at most one change per flap


async def test_dns_switch_is_followed_over_keep_alive(make_agent, center: FakeCenter, dns):
    other = await FakeCenter(host="127.0.0.3", port=center.port).start()
    try:
        dns.set("orders.sandbox.test", "127.0.0.2")
        url = f"http://orders.sandbox.test:{center.port}/v3"
        agent = await make_agent(url, upstream={"nameservers": [dns.nameserver]}, health=HEALTH)
        for n in range(3):
            assert (await agent.post(order(f"a{n}")))[1]["cluster"] == "primary"
        assert len(center.creates) == 3 and other.received == []

        dns.set("orders.sandbox.test", "127.0.0.3")
        switched = time.monotonic()
        n = 0

        async def follows() -> bool:
            nonlocal n
            n += 1
            await agent.post(order(f"b{n}"))
            return f"douyin:b{n}" in other.creates

        await wait_for(follows, 5, "orders to follow the DNS switch", interval=0.05)
        assert time.monotonic() - switched <= 1 + 0.1 + 1.0  # TTL + interval + slack
        before = len(center.received)
        for m in range(5):  # and they stay there: no pooled connection to the old address
            assert (await agent.post(order(f"c{m}")))[0] == 201
        assert len(center.received) == before
        assert {f"douyin:c{m}" for m in range(5)} <= other.created_keys()
    finally:
        await other.stop()


@pytest.mark.parametrize("failure", ["nxdomain", "servfail", "silent"])
async def test_dns_failures_are_health_failures_with_a_reason(make_agent, dns, failure: str):
    if failure == "nxdomain":
        host = "missing.sandbox.test"
    else:
        host = "orders.sandbox.test"
        dns.set(host, "127.0.0.2")
        dns.mode = failure
    agent = await make_agent(
        f"http://{host}:9/v3", upstream={"nameservers": [dns.nameserver]}, health=HEALTH
    )
    status, body = await agent.post(order(1))
    assert status == 202 and body["status"] == "buffered"  # offline: buffered, not crashed
    status, st = await agent.get("/status")
    error = st["clusters"]["primary"]["last_error"]
    expected = {"nxdomain": "NXDOMAIN", "servfail": "nameserver failed", "silent": "timeout"}[
        failure
    ]
    assert expected in error, error
    assert st["mode"] == "offline"


async def test_garbage_health_answer_is_a_failure(make_agent):
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"\x00\xffnot http at all\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.5", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        agent = await make_agent(f"http://127.0.0.5:{port}/v3", health=HEALTH)
        status, st = await agent.get("/status")
        assert status == 200 and st["clusters"]["primary"]["healthy"] is False
        assert st["clusters"]["primary"]["last_error"]
        assert (await agent.post(order(1)))[0] == 202
    finally:
        server.close()
        await server.wait_closed()


async def test_retry_after_a_crash_mid_forward_stays_with_that_cluster(
    tmp_path, center: FakeCenter, standby: FakeCenter, agent_process, http
):
    """kill -9 while the primary holds the request: the retry must not go to the standby."""
    from tests.support.harness import write_config

    path = write_config(
        tmp_path, center.url, upstream={"standby": standby.url, "timeout_s": 5}, health=HEALTH
    )
    proc = agent_process(path)
    proc.start()
    await proc.wait_ready(http)
    center.delay_s = 3.0
    import orjson

    body = orjson.dumps(order("mid"))
    hdrs = {"Content-Type": "application/json"}
    post = asyncio.create_task(http.post(f"{proc.url}/v1/orders", data=body, headers=hdrs))
    await wait_for(lambda: len(center.received) == 1, 5, "request at the primary")
    proc.kill()
    await proc.reap()
    with pytest.raises(Exception):  # noqa: B017 - the client sees the connection die
        (await post).raise_for_status()
    # The primary created it after all (its handler finishes), then goes down.
    await wait_for(lambda: "douyin:mid" in center.creates, 5, "primary create")
    center.delay_s = 0
    await center.go_down()

    proc2 = agent_process(path)
    proc2.start()
    await proc2.wait_ready(http)
    async with http.post(f"{proc2.url}/v1/orders", data=body, headers=hdrs) as r:
        assert r.status == 202, await r.text()  # buffered for the primary
    assert standby.received == []
    await center.come_up()
    await wait_for(lambda: len(center.received) >= 2, 10, "redelivery to the primary")
    assert center.creates["douyin:mid"] == 1
    assert standby.received == []
