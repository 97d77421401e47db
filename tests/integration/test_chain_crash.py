"""Chain verification under kill -9: an order's place in the ledger is never lost.

The agent runs as a real subprocess (``python -m agent run``) against a real
FakeCenter and the downstream trio; it is killed with SIGKILL while the drain
delivers buffered orders and the verifier enrols and checks them, restarted on
the same config, and every delivered order must be in the ledger with its steps.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.chain_fakes import Downstream, chain_section
from tests.support.fakes import FakeCenter
from tests.support.harness import order, wait_for, write_config

pytestmark = pytest.mark.slow
ORDERS = 60


@pytest.fixture
async def downstream(center: FakeCenter) -> AsyncIterator[Downstream]:
    ds = await Downstream(center=center).start()
    yield ds
    await ds.stop()


def merged(spool: Path) -> list[str]:
    return sorted(
        n for n in os.listdir(spool / "merged") if n.endswith(".json") and not n.startswith(".")
    )


async def chains(session: aiohttp.ClientSession, url: str, serials: list[str]) -> dict[str, Any]:
    out = {}
    for serial in serials:
        async with session.get(f"{url}/v1/orders/{serial}") as r:
            out[serial] = (await r.json())["chain"]
    return out


async def test_kill9_mid_drain_and_mid_verification_keeps_every_order_in_the_ledger(
    tmp_path: Path, center: FakeCenter, downstream: Downstream, agent_process: Any
):
    config = write_config(
        tmp_path,
        center.url,
        buffer={"drain_rate_per_s": 40},
        chain=chain_section(downstream, recheck_interval_s=0.2),
    )
    spool = tmp_path / "spool"
    center.mode = "503"  # the outage: every order is buffered
    async with aiohttp.ClientSession() as session:
        agent = agent_process(config)
        agent.start()
        await agent.wait_ready(session)
        serials = []
        for n in range(ORDERS):
            async with session.post(
                f"{agent.url}/v1/orders",
                data=orjson.dumps(order(n, total_amount="8.80")),
                headers={"Content-Type": "application/json"},
            ) as r:
                assert r.status == 202
                serials.append((await r.json())["serial"])
        center.mode = "up"  # recovery: the drain delivers at 40/s, the verifier follows
        await wait_for(
            lambda: len(merged(spool)) >= ORDERS // 3, timeout=30, what="a third delivered"
        )
        agent.kill()  # SIGKILL mid-drain, mid-enrolment, mid-check
        assert await agent.reap() != 0

    async with aiohttp.ClientSession() as session:
        agent = agent_process(config)
        agent.start()
        await agent.wait_ready(session)
        await wait_for(lambda: len(merged(spool)) == ORDERS, timeout=30, what="all delivered")

        async def all_enrolled() -> bool:
            found = await chains(session, agent.url, serials)
            return all(
                c is not None and set(c) == {"logistics", "invoice", "finance"}
                for c in found.values()
            )

        await wait_for(all_enrolled, timeout=30, what="every order in the ledger")
        downstream.invoice_all = True

        async def all_verified() -> bool:
            found = await chains(session, agent.url, serials)
            return all(
                c == {"logistics": "verified", "invoice": "verified", "finance": "verified"}
                for c in found.values()
            )

        await wait_for(all_verified, timeout=60, what="every step verified")
        async with session.get(f"{agent.url}/status") as r:
            status = await r.json()
        assert status["chain"]["invoice"]["verified"] == ORDERS
        # Each tracking re-pushed: after a kill at most once more (a lost last result).
        assert all(1 <= n <= 2 for n in downstream.repush_calls.values())
        assert len(downstream.repush_calls) == ORDERS
        agent.kill(15)
        assert await agent.reap() == 0
