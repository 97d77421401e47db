"""The "forwarded" row is committed behind the 201 (issue 23): a crash or power cut may
leave only the order's durable intent ("forwarding", its serial and cluster). The cluster
it went to settles it: a lookup asks ``GET /orders/by-key``, a retry is sent there under
the same serial and answered 200 duplicate. (tests/system/test_power_loss.py makes this
state with a real power cut; here it is made directly, to try every answer.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.support.fakes import FakeCenter
from tests.support.harness import AgentFactory, AgentHandle, order, wait_for


async def _after_a_cut(make_agent: AgentFactory, center: FakeCenter) -> tuple[AgentHandle, str]:
    """An order created at the center and answered 201, then the agent stopped with only
    its intent in the journal, as a cut before the outcome row's commit leaves it."""
    agent = await make_agent(center.url)
    status, body = await agent.post(order(1))
    assert status == 201, body
    await agent.service.stop()
    journal = Path(agent.cfg.agent.state_dir) / "journal.sqlite3"
    with sqlite3.connect(journal) as db:
        db.execute(
            "UPDATE orders SET state = 'forwarding', order_id = NULL WHERE serial = ?",
            (body["serial"],),
        )
    return await make_agent(center.url), body["serial"]


def _state(agent: AgentHandle, serial: str) -> str:
    journal = Path(agent.cfg.agent.state_dir) / "journal.sqlite3"
    with sqlite3.connect(journal) as db:
        return str(db.execute("SELECT state FROM orders WHERE serial = ?", (serial,)).fetchone()[0])


async def test_a_lookup_settles_the_intent_with_its_cluster(make_agent, center: FakeCenter):
    agent, serial = await _after_a_cut(make_agent, center)
    status, doc = await agent.get(f"/v1/orders/{serial}")
    assert status == 200, doc
    assert doc["state"] == "forwarded" and doc["cluster"] == "primary"
    assert doc["order_id"] == center.orders["douyin:1"][0]
    status, by_key = await agent.get("/v1/orders/by-key/douyin:1")
    assert status == 200 and by_key["serial"] == serial
    await wait_for(lambda: _state(agent, serial) == "forwarded", what="the settled row committed")
    assert center.creates["douyin:1"] == 1


async def test_a_cluster_that_cannot_say_gives_503_and_one_without_it_404(
    make_agent, center: FakeCenter
):
    agent, serial = await _after_a_cut(make_agent, center)
    await center.go_down()
    status, doc = await agent.get(f"/v1/orders/{serial}")
    assert status == 503 and "retry" in doc["error"], doc
    assert _state(agent, serial) == "forwarding"  # nothing decided on no answer
    await center.come_up()
    del center.orders["douyin:1"]  # the center does not hold it: no 201 was ever true
    status, doc = await agent.get(f"/v1/orders/{serial}")
    assert status == 404, doc


async def test_a_retry_goes_to_the_same_cluster_and_gets_200_duplicate(
    make_agent, center: FakeCenter
):
    agent, serial = await _after_a_cut(make_agent, center)
    status, body = await agent.post(order(1))
    assert (status, body) == (200, {"status": "duplicate", "serial": serial})
    assert center.received[-1].headers["X-Edge-Serial"] == serial
    assert center.creates["douyin:1"] == 1
