"""A real ``edge-agent run`` subprocess: kill -9 never causes a second SMS for a serial,
and no full phone number (nor a secret) ever reaches its stderr."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.fakes import FakeAliyun, FakeCenter, FakeSmsGateway
from tests.support.harness import AgentProcess, order, sms_http, wait_for, write_config


async def _status(session: aiohttp.ClientSession, p: AgentProcess) -> dict[str, Any]:
    async with session.get(f"{p.url}/status") as r:
        return dict(orjson.loads(await r.read()))


async def _load(
    session: aiohttp.ClientSession,
    url: str,
    worker: int,
    accepted: dict[str, str],
    answered: list[str],
) -> None:
    """Post orders with phones until cancelled; remember every 202 that said "queued"."""
    n = 0
    while True:
        n += 1
        phone = f"139{worker:02d}{n:06d}"
        try:
            async with session.post(
                f"{url}/v1/orders",
                data=orjson.dumps(order(f"k{worker}-{n}-{random.random()}", customer_phone=phone)),
                headers={"Content-Type": "application/json"},
            ) as r:
                body = orjson.loads(await r.read())
        except (aiohttp.ClientError, orjson.JSONDecodeError):
            await asyncio.sleep(0.01)  # the agent is gone: wait for the next one
            continue
        if r.status == 202:
            answered.append(body["serial"])
            if body["sms"] == "queued":
                accepted[body["serial"]] = phone


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
async def test_kill_9_at_random_moments_never_sends_an_sms_twice(
    round_: int,
    tmp_path: Path,
    center: FakeCenter,
    sms_gateway: FakeSmsGateway,
    http: aiohttp.ClientSession,
    agent_process: Any,
):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    await center.go_down()
    sms_gateway.delay_s = 0.03  # a window in which rows are "sending"
    config = write_config(tmp_path, center.url, sms=sms_http(sms_gateway, per_phone_per_hour=0))
    accepted: dict[str, str] = {}
    answered: list[str] = []
    for _ in range(3):
        p = agent_process(config)
        p.start()
        await p.wait_ready(http)
        load = [asyncio.create_task(_load(http, p.url, w, accepted, answered)) for w in range(4)]
        await asyncio.sleep(rng.uniform(0.1, 0.8))  # the random moment of the crash
        p.kill(signal.SIGKILL)
        await p.reap()
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)

    last = agent_process(config)
    last.start()
    await last.wait_ready(http)

    async def outbox_empty() -> bool:
        return (await _status(http, last))["sms_outbox"] == 0

    await wait_for(outbox_empty, 30, "the outbox to finish")
    last.kill(signal.SIGTERM)
    assert await last.reap() == 0

    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite3") as db:
        states = dict(db.execute("SELECT serial, state FROM sms").fetchall())
    counts = sms_gateway.per_serial()
    twice = {s: n for s, n in counts.items() if n > 1}
    assert twice == {}, f"seed {seed}: a second SMS for {twice}"
    assert accepted, f"seed {seed}: no order was accepted"
    for serial, phone in accepted.items():
        # Every "queued" answer ends in exactly one SMS, unless the crash hit the call
        # itself: then the row is ambiguous and the customer got at most one.
        assert states.get(serial) in ("sent", "ambiguous"), (seed, serial, states.get(serial))
        if states[serial] == "sent":
            assert counts[serial] == 1, (seed, serial)
            assert [r.phone for r in sms_gateway.received if r.serial == serial] == [phone]
    for serial in counts:
        assert states.get(serial) in ("sent", "ambiguous"), (seed, serial)
    text = (tmp_path / "agent.log").read_text()
    assert not re.search(r"(?<!\d)139\d{8}(?!\d)", text), "an unmasked phone in stderr"


async def test_stderr_never_has_a_full_phone_or_a_secret(
    tmp_path: Path,
    center: FakeCenter,
    aliyun: FakeAliyun,
    http: aiohttp.ClientSession,
    agent_process: Any,
):
    await center.go_down()
    cred = tmp_path / "aliyun.cred"
    cred.write_text(
        f"access_key_id = {aliyun.access_key_id}\naccess_key_secret = {aliyun.access_key_secret}\n"
    )
    aliyun.codes.append("isv.BUSINESS_LIMIT_CONTROL")
    config = write_config(
        tmp_path,
        center.url,
        sms={
            "provider": "aliyun",
            "endpoint": aliyun.endpoint,
            "template_code": "SMS_1",
            "credentials_file": str(cred),
            "per_phone_per_hour": 1,
            "rate_limited_pause_s": 0.2,
            "retry_initial_s": 0.1,
        },
    )
    p = agent_process(config)
    p.start()
    await p.wait_ready(http)
    phones = ["13812345678", "+8613912345678", "+447911123456", "12812345678", "13812345678"]
    for n, phone in enumerate(phones):
        async with http.post(
            f"{p.url}/v1/orders",
            data=orjson.dumps(order(f"m{n}", customer_phone=phone, note=f"call {phone}")),
            headers={"Content-Type": "application/json"},
        ) as r:
            assert r.status == 202
    # The notices reach the fake endpoint; one is throttled once, the repeat suppressed.
    await wait_for(lambda: len(aliyun.received) == 3, 15, "3 SendSms")

    async def settled() -> bool:
        doc = await _status(http, p)
        return bool(doc["sms_outbox"] == 0)

    await wait_for(settled, 10, "outbox settled")
    by_state = (await _status(http, p))["sms"]["by_state"]
    assert (by_state["sent"], by_state["skipped"], by_state["suppressed"]) == (3, 1, 1)
    p.kill(signal.SIGTERM)
    assert await p.reap() == 0
    text = (tmp_path / "agent.log").read_text()
    assert all(isinstance(orjson.loads(line), dict) for line in text.splitlines())
    for full in ("13812345678", "13912345678", "7911123456", "12812345678"):
        assert full not in text, f"{full} unmasked in stderr"
    for masked in ("138****5678", "139****5678", "+447****3456", "128****5678"):
        assert masked in text
    assert aliyun.access_key_secret not in text
    assert "SMS for" in text  # the outbox did log about these notices
