"""The promise under the faults production brings (issue 10): full disks, clusters that
refuse the agent or answer with HTML, a neighbour moving files, damaged state, a moved
buffer, kill -9 right after a 201, and merged/ name clashes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.config import load_config
from tests.support.fakes import FakeCenter
from tests.support.harness import ROOT, AgentHandle, order, wait_for, write_config
from tests.support.recover_helpers import recover

HEALTH = {"interval_s": 0.1, "timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 1}


async def _buffer(agent: AgentHandle, n: int, prefix: str, **extra: Any) -> dict[str, str]:
    """key -> serial of ``n`` orders that got 202."""
    out = {}
    for i in range(n):
        status, body = await agent.post(order(f"{prefix}-{i}", **extra))
        assert status == 202, body
        out[f"douyin:{prefix}-{i}"] = body["serial"]
    return out


async def _status(agent: AgentHandle) -> dict[str, Any]:
    status, body = await agent.get("/status")
    assert status == 200
    return body


# -- a full disk never stalls the drain ---------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs: a real filesystem that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> None:
    """Take every byte left on the filesystem of ``directory`` (it may be full already)."""
    try:
        with open(directory / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass


async def test_a_full_disk_never_stalls_the_drain(make_agent, center: FakeCenter, small_disk: Path):
    await center.go_down()
    agent = await make_agent(
        center.url,
        buffer={"path": str(small_disk / "spool")},
        health=HEALTH,
        sms={"enabled": False},
    )
    accepted: dict[str, str] = {}
    note = "z" * 3000
    for i in range(2000):  # until the disk is full: 507, nothing dropped
        status, body = await agent.post(order(f"full-{i}", note=note))
        if status == 507:
            break
        assert status == 202, body
        accepted[f"douyin:full-{i}"] = body["serial"]
    else:
        pytest.fail("the 3 MiB disk never filled")
    assert len(accepted) > 100
    _fill(small_disk)  # not a byte left, not even for a merged/ copy
    with pytest.raises(OSError):
        (small_disk / "probe").write_bytes(b"x" * 8192)
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 30, "the whole buffer to drain")
    assert set(center.created_keys()) == set(accepted)
    assert all(n == 1 for n in center.creates.values())
    assert agent.files("rejected") == []
    assert sorted(agent.files("merged")) == sorted(f"{s}.json" for s in accepted.values())
    for key, serial in list(accepted.items())[:5]:  # the journal has the order_id
        status, found = await agent.get(f"/v1/orders/{serial}")
        assert (status, found["state"], found["order_id"]) == (200, "merged", center.orders[key][0])


# -- a cluster that refuses the agent keeps every order -----------------------------------


@pytest.mark.parametrize("refusal", [401, 404])
async def test_a_cluster_refusing_the_agent_never_quarantines_the_buffer(
    make_agent, center: FakeCenter, refusal: int
):
    await center.go_down()
    agent = await make_agent(center.url, health=HEALTH)
    buffered = await _buffer(agent, 20, f"refused{refusal}")
    center.refuse = refusal  # /health says 200, POST /orders says 401 (or 404)
    await center.come_up()
    center.refuse = refusal

    async def refusing() -> bool:
        return (await _status(agent))["clusters"]["primary"]["refusing"] is not None

    await wait_for(refusing, 10, "the primary to be marked as refusing the agent")
    await wait_for(lambda: len(center.received) >= 2, 10, "a retry after the hold")
    assert agent.files("rejected") == []
    assert len(agent.files("pending")) == 20
    status = await _status(agent)
    assert (
        status["mode"] == "offline"
        and f"HTTP {refusal}" in status["clusters"]["primary"]["refusing"]
    )
    metrics = (await agent.get("/metrics"))[1]
    assert 'edge_cluster_refusing{cluster="primary"} 1.0' in metrics
    # New orders are kept too, not passed back as a 401 or 404 to the channel.
    status_code, body = await agent.post(order(f"refused{refusal}-new"))
    assert status_code == 202, body
    center.refuse = None  # the token was renewed
    await wait_for(lambda: agent.files("pending") == [], 15, "drain once it takes orders")
    assert center.created_keys() == set(buffered) | {f"douyin:refused{refusal}-new"}
    assert (await _status(agent))["clusters"]["primary"]["refusing"] is None


async def test_the_forward_path_moves_on_when_the_primary_refuses_the_agent(
    make_agent, center: FakeCenter, standby: FakeCenter
):
    agent = await make_agent(center.url, upstream={"standby": standby.url}, health=HEALTH)
    center.refuse = 403
    status, body = await agent.post(order("fwd-403"))
    assert (status, body["cluster"]) == (201, "standby"), body
    assert (await _status(agent))["mode"] == "standby"


# -- a 2xx without an order_id is not proof of creation -----------------------------------


async def test_a_maintenance_page_answering_200_is_not_a_delivery(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(center.url, health=HEALTH)
    buffered = await _buffer(agent, 10, "page")
    center.page = 200
    await center.come_up()
    center.page = 200

    def pins() -> list[Any]:
        return [
            orjson.loads((agent.spool / "pending" / f).read_bytes())["pinned_to"]
            for f in agent.files("pending")
        ]

    # Each attempt is unclear (the primary may hold the order now): pinned to it.
    await wait_for(lambda: pins() == ["primary"] * 10, 10, "every order pinned to primary")
    assert len(center.received) >= 10
    assert agent.files("merged") == []
    center.page = None
    await wait_for(lambda: agent.files("pending") == [], 15, "drain after maintenance")
    assert center.created_keys() == set(buffered)
    for f in agent.files("merged"):
        assert orjson.loads((agent.spool / "merged" / f).read_bytes())["order_id"]


# -- the count follows the directory, whoever moves the files -----------------------------


async def test_capacity_and_counts_follow_edge_recover(make_agent, center: FakeCenter):
    await center.go_down()
    agent = await make_agent(
        center.url, health=HEALTH, buffer={"max_bytes": 6000}, sms={"enabled": False}
    )
    accepted = 0
    serials = []
    while True:
        status, body = await agent.post(order(f"cap-{accepted}"))
        if status == 507:
            break
        assert status == 202, body
        serials.append(body["serial"])
        accepted += 1
    assert (await _status(agent))["pending"] == accepted
    standby = await FakeCenter(host="127.0.0.5", name="other").start()
    try:
        run = await recover("--path", str(agent.spool), "--mode", "merge", "--target", standby.url)
        assert run.code == 0, run.err
    finally:
        await standby.stop()
    assert agent.files("pending") == []
    assert (await _status(agent))["pending"] == 0
    status, found = await agent.get(f"/v1/orders/{serials[0]}")
    assert (status, found["state"]) == (200, "merged")  # customer service sees the truth
    status, body = await agent.post(order("cap-after"))
    assert status == 202, body


# -- a damaged state database does not stop the agent -------------------------------------


async def test_a_damaged_journal_and_outbox_are_moved_aside_and_rebuilt(
    tmp_path: Path, center: FakeCenter, sms_gateway, http: aiohttp.ClientSession
):
    await center.go_down()
    sms = {"provider": "http", "url": sms_gateway.url, "retry_initial_s": 0.1, "retry_max_s": 0.3}
    path = write_config(tmp_path, center.url, health=HEALTH, sms=sms)
    agent = AgentHandle(load_config(str(path)), http)
    await agent.service.start()
    buffered = {}
    for i in range(5):
        status, body = await agent.post(order(f"dmg-{i}", customer_phone=f"1381234567{i}"))
        assert status == 202, body
        buffered[f"douyin:dmg-{i}"] = body["serial"]
    await wait_for(lambda: len(sms_gateway.received) == 5, 10, "five SMS")
    await agent.service.stop()
    state = tmp_path / "state"
    for name in ("journal.sqlite3", "outbox.sqlite3"):
        with open(state / name, "r+b") as fh:
            fh.write(b"this is not a database header")
    agent = AgentHandle(load_config(str(path)), http)
    await agent.service.start()  # no exit, no restart loop
    try:
        assert sorted(
            p.name.split(".damaged-")[0]
            for p in state.iterdir()
            if ".damaged-" in p.name and not p.name.endswith(("-wal", "-shm"))
        ) == ["journal.sqlite3", "outbox.sqlite3"]
        for i, (key, serial) in enumerate(buffered.items()):  # rebuilt from the files
            status, found = await agent.get(f"/v1/orders/{serial}")
            assert (status, found["state"]) == (200, "buffered")
            status, body = await agent.post(
                order(key.split(":")[1], customer_phone=f"1381234567{i}")
            )
            assert (status, body["serial"]) == (200, serial)
        sms_state = (await _status(agent))["sms"]["by_state"]
        assert sms_state.get("ambiguous") == 5 and sms_state.get("queued", 0) == 0
        assert len(sms_gateway.received) == 5  # never a second SMS
    finally:
        await agent.service.stop()


# -- kill -9 right after 201s: every forwarded order is findable --------------------------


async def test_every_201_is_findable_after_kill9(
    tmp_path: Path, center: FakeCenter, agent_process, http
):
    config = write_config(tmp_path, center.url, health=HEALTH)
    agent = agent_process(config)
    agent.start()
    await agent.wait_ready(http)
    bodies = {f"douyin:k9-{i}": orjson.dumps(order(f"k9-{i}")) for i in range(60)}
    answers: dict[str, dict[str, Any]] = {}

    async def one(key: str) -> None:
        async with http.post(
            f"{agent.url}/v1/orders", data=bodies[key], headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 201
            answers[key] = orjson.loads(await r.read())

    await asyncio.gather(*(one(k) for k in bodies))
    agent.kill()  # at once, right after the last 201
    await agent.reap()
    agent.start()
    await agent.wait_ready(http)
    for key, answer in answers.items():
        async with http.get(f"{agent.url}/v1/orders/{answer['serial']}") as r:
            assert r.status == 200, key
            found = orjson.loads(await r.read())
        assert (found["state"], found["order_id"]) == ("forwarded", answer["order_id"])
        async with http.post(
            f"{agent.url}/v1/orders", data=bodies[key], headers={"Content-Type": "application/json"}
        ) as r:
            assert (r.status, orjson.loads(await r.read())["serial"]) == (200, answer["serial"])
    assert all(n == 1 for n in center.creates.values())


# -- a moved buffer.path is refused, never reported as merged -----------------------------


async def test_changing_buffer_path_with_orders_left_behind_refuses_to_start(
    tmp_path: Path, center: FakeCenter, agent_process, http
):
    await center.go_down()
    config = write_config(tmp_path, center.url, health=HEALTH)
    agent = agent_process(config)
    agent.start()
    await agent.wait_ready(http)
    async with http.post(
        f"{agent.url}/v1/orders",
        data=orjson.dumps(order("moved-1")),
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.status == 202
    agent.kill(15)
    assert await agent.reap() == 0
    listen = load_config(str(config)).agent.listen  # the same agent, moved buffer
    write_config(
        tmp_path,
        center.url,
        health=HEALTH,
        agent={"listen": listen},
        buffer={"path": str(tmp_path / "new")},
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        "--config",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:  # it started instead of refusing: never leave it behind
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    last = err.decode().strip().splitlines()[-1]
    assert str(tmp_path / "spool") in last and str(tmp_path / "new") in last, last
    # Moving the files as the message says lets it start and serve them.
    shutil.copytree(
        tmp_path / "spool" / "pending", tmp_path / "new" / "pending", dirs_exist_ok=True
    )
    agent.start()
    await agent.wait_ready(http)
    await center.come_up()
    await wait_for(lambda: "douyin:moved-1" in center.creates, 10, "the order delivered")


# -- merged/ holding the name of another order --------------------------------------------


async def test_a_pending_file_is_not_dropped_for_a_different_order_in_merged(
    make_agent, center: FakeCenter
):
    await center.go_down()
    agent = await make_agent(center.url, health=HEALTH)
    (serial,) = (await _buffer(agent, 1, "clash")).values()
    impostor = {"v": 1, "serial": serial, "dedupe_key": "other:1", "body": "{}", "order_id": "X1"}
    (agent.spool / "merged" / f"{serial}.json").write_bytes(orjson.dumps(impostor))
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 10, "the pending file handled")
    assert f"{serial}.json" in agent.files("rejected")
    reason = orjson.loads((agent.spool / "rejected" / f"{serial}.json.reason.json").read_bytes())
    assert reason["reason"] == "name_clash"
    assert orjson.loads((agent.spool / "merged" / f"{serial}.json").read_bytes()) == impostor
