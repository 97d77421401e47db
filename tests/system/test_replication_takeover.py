"""A lost server's orders, taken over from the replica (CONTRACT 11), and kill -9 of the
agent between its local write and the replica's acknowledgement.

The agent runs as a real subprocess; the nats-server nodes are real processes; the
center is a loopback fake that counts creates per key.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.replica.stream import DELIVERED, PINNED
from agent.sandbox.nats_cluster import NatsCluster, read_replica
from tests.integration.test_crash import (
    client,
    order_files,
    orders_for,
    post,
    reap,
    send_all,
    start_agent,
)
from tests.support.fakes import FakeCenter, free_port
from tests.support.harness import order, wait_for, write_config
from tests.support.nats_cluster import stream_leader
from tests.support.recover_helpers import Recover, kill_when, recover

pytestmark = pytest.mark.replication
LOST = "wh-lost"


def agent_config(
    workdir: Path, center: FakeCenter, cluster: NatsCluster, node: str, **replication: Any
) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return write_config(
        workdir,
        center.url,
        agent={
            "node_id": node,
            "listen": f"127.0.0.1:{free_port()}",
            "state_dir": str(workdir / "state"),
            "shutdown_timeout_s": 5,
        },
        buffer={"path": str(workdir / "spool"), "scan_interval_s": 1, "drain_rate_per_s": 1000},
        replication={
            "enabled": True,
            "servers": cluster.urls,
            "replicas": 3,
            "timeout_s": 1,
            **replication,
        },
    )


async def states(cluster: NatsCluster, node: str = LOST) -> dict[str, Any]:
    found: dict[str, Any] = await wait_for(
        lambda: _try_read(cluster, node), 30, "the replica listing", interval=0.3
    )
    return found


async def _try_read(cluster: NatsCluster, node: str) -> dict[str, Any] | None:
    try:
        return {s: c.state for s, c in (await read_replica(cluster.urls, node)).items()}
    except Exception:
        return None


async def buffer_on_lost_server(
    tmp_path: Path, center: FakeCenter, cluster: NatsCluster, agent_process: Any, n: int
) -> tuple[Path, dict[str, str]]:
    """The lost server took ``n`` orders (202) during an outage, then was killed -9."""
    await center.go_down()
    config = agent_config(tmp_path / "lost", center, cluster, LOST)
    bodies = orders_for("lost", n)
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        answers = await send_all(session, agent.url, bodies, bodies)
        assert {s for s, _ in answers.values()} == {202}, answers
        agent.kill(signal.SIGKILL)
        assert await reap(agent) == -signal.SIGKILL
    return config, {k: body["serial"] for k, (_, body) in answers.items()}


async def server_lost(
    tmp_path: Path, center: FakeCenter, cluster: NatsCluster, agent_process: Any, n: int
) -> tuple[dict[str, str], Path]:
    """The lost server's ``n`` orders, the server gone (state dir and buffer deleted), the
    center back, and another machine's config: (key -> serial, that config)."""
    _, serials = await buffer_on_lost_server(tmp_path, center, cluster, agent_process, n)
    shutil.rmtree(tmp_path / "lost")
    await center.come_up()
    return serials, agent_config(tmp_path / "other", center, cluster, "wh-other")


async def test_lost_server_orders_merged_from_another_machine_exactly_once(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    serials, other = await server_lost(tmp_path, center, nats_cluster, agent_process, 40)
    dry = await recover("--from-replica", LOST, "--mode", "dry-run", "--config", str(other))
    assert dry.code == 0, dry.err
    assert center.received == []
    report = tmp_path / "report.json"
    run = await recover(
        "--from-replica", LOST, "--mode", "merge", "--config", str(other), "--report", str(report)
    )
    assert run.code == 0, run.err
    assert center.created_keys() == set(serials)
    assert center.duplicates() == {}
    held = await states(nats_cluster)
    assert {held[s] for s in serials.values()} == {DELIVERED}
    assert orjson.loads(report.read_bytes())
    # Merged straight from the replica: no order was written as a work file.
    work = tmp_path / "other" / "state" / "takeover" / LOST
    assert [p.name for p in work.rglob("*.json")] == []
    sent = sum(center.sends().values())
    again = await recover("--from-replica", LOST, "--mode", "merge", "--config", str(other))
    assert again.code == 0, again.err
    assert sum(center.sends().values()) == sent  # the replica says delivered: nothing resent
    verify = await recover("--from-replica", LOST, "--mode", "verify", "--config", str(other))
    assert verify.code == 0, verify.err + verify.out


async def test_takeover_right_after_the_stream_leaders_node_was_lost(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    """The lost server's NATS node led the stream. Until JetStream elects a new leader
    (seconds) every write is answered "no responders": a takeover started at once
    delivered every order but exited 1 with none marked (seen in CI). It keeps
    publishing the marks until the new leader takes them."""
    serials, other = await server_lost(tmp_path, center, nats_cluster, agent_process, 20)
    leader = await stream_leader(nats_cluster)
    nats_cluster.kill(next(node for node in nats_cluster.nodes if node.name == leader))
    run = await recover("--from-replica", LOST, "--mode", "merge", "--config", str(other))
    assert run.code == 0, run.err
    assert center.created_keys() == set(serials) and center.duplicates() == {}
    held = await states(nats_cluster)
    assert {held[s] for s in serials.values()} == {DELIVERED}


async def test_takeover_with_the_replica_gone_mid_way_waits_once_not_per_batch(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    """All NATS nodes die while a takeover delivers: the marks cannot be written. It
    keeps trying for one budget of 20 s for the whole run, then settles every later
    batch at once (exit 1, "not marked", the next run marks them): 20 s per batch would
    hold a 100,000-order takeover for hours."""
    serials, other = await server_lost(tmp_path, center, nats_cluster, agent_process, 200)
    run = await Recover(
        "--from-replica", LOST, "--mode", "merge", "--config", str(other), "--batch", "10"
    ).start()
    await wait_for(lambda: len(center.created_keys()) >= 10, 30, "the first batch created")
    for node in nats_cluster.nodes:
        nats_cluster.kill(node)
    done = await run.finish(timeout=60)  # one 20 s budget takes ~25 s; one per batch ~85 s
    assert done.code == 1, done.err
    assert "not marked in the replica" in done.err
    assert center.created_keys() == set(serials) and center.duplicates() == {}


async def test_takeover_with_the_lost_servers_nats_node_down_too(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    """A lost server takes its own NATS node with it. Each listing places a new consumer,
    which JetStream may put on the dead node (about one time in two, never answered):
    every listing, the takeover and its verify still work."""
    serials, other = await server_lost(tmp_path, center, nats_cluster, agent_process, 20)
    nats_cluster.kill(nats_cluster.nodes[2])
    for _ in range(8):
        held = await read_replica(nats_cluster.urls, LOST)
        assert set(held) == set(serials.values())
    run = await recover("--from-replica", LOST, "--mode", "merge", "--config", str(other))
    assert run.code == 0, run.err
    assert center.created_keys() == set(serials) and center.duplicates() == {}
    verify = await recover("--from-replica", LOST, "--mode", "verify", "--config", str(other))
    assert verify.code == 0, verify.err + verify.out


async def test_takeover_resumes_after_kill9(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    serials, other = await server_lost(tmp_path, center, nats_cluster, agent_process, 60)
    center.delay_s = 0.05
    args = ("--from-replica", LOST, "--mode", "merge", "--config", str(other), "--batch", "1")
    proc = await Recover(*args, "--concurrency", "2").start()
    await kill_when(proc, lambda: len(center.creates) >= 10, signal.SIGKILL, "10 creates")
    first = await proc.finish()
    assert first.code == -signal.SIGKILL
    assert len(center.creates) < len(serials)
    center.delay_s = 0.0
    run = await recover(*args)
    assert run.code == 0, run.err
    assert center.created_keys() == set(serials)
    assert center.duplicates() == {}
    held = await states(nats_cluster)
    assert {held[s] for s in serials.values()} == {DELIVERED}


async def taken_over(
    tmp_path: Path, center: FakeCenter, cluster: NatsCluster, agent_process: Any, n: int
) -> tuple[Path, dict[str, str], Counter[str]]:
    """The lost server's ``n`` orders merged from another machine while its disk (and
    so its pending/) survived: (its config, key -> serial, the center's sends)."""
    config, serials = await buffer_on_lost_server(tmp_path, center, cluster, agent_process, n)
    await center.come_up()
    other = agent_config(tmp_path / "other", center, cluster, "wh-other")
    run = await recover("--from-replica", LOST, "--mode", "merge", "--config", str(other))
    assert run.code == 0, run.err
    sent = center.sends()
    assert set(sent) == set(serials) and set(sent.values()) == {1}
    return config, serials, sent


async def test_a_pin_reaches_the_replica_before_the_order_is_sent_again(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    """An unclear answer (the center created the order but answered too late) pins the
    order to the target; the pin is in the replica before the next attempt, so a takeover
    killed -9 right then leaves it pinned for whoever takes over next (CONTRACT 5)."""
    serials, other = await server_lost(tmp_path, center, nats_cluster, agent_process, 1)
    (serial,) = serials.values()
    center.late_s = 30.0  # created at once, answered after the 2 s upstream timeout
    proc = await Recover(
        "--from-replica", LOST, "--mode", "merge", "--config", str(other), "--batch", "1"
    ).start()

    async def pinned() -> bool:
        held = await _try_read_changes(nats_cluster)
        return held is not None and held[serial].state == PINNED

    try:
        await wait_for(pinned, 30, "the pin in the replica", interval=0.2)
    finally:
        proc.signal(signal.SIGKILL)
        await proc.finish()
    held = await _try_read_changes(nats_cluster)
    assert held is not None
    assert held[serial].record.pinned_to == held[serial].cluster == "primary"
    assert len(center.creates) == 1


async def test_an_order_pinned_elsewhere_is_left_with_a_takeover_command_to_deliver_it(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    """An order the replica shows pinned to the standby is not sent to the primary; the
    advice printed is a command that reaches it: the takeover again, not a directory."""
    import nats

    from agent.replica.stream import PENDING, Change, Publisher, ensure_stream
    from agent.sandbox.nats_cluster import quiet_errors
    from tests.support.recover_helpers import record

    free, pinned = record(1, 1, node=LOST), record(2, 2, node=LOST).pinned("standby")
    nc = await nats.connect(servers=nats_cluster.urls, error_cb=quiet_errors)
    try:
        await ensure_stream(nc.jetstream(timeout=5), 3, 5)
        changes = [Change(PENDING, free), Change(PENDING, pinned)]
        stored = await Publisher(nc).publish_all(changes, 5)
        assert all(isinstance(seq, int) for seq in stored), stored
    finally:
        await nc.close()
    other = agent_config(tmp_path / "other", center, nats_cluster, "wh-other")
    run = await recover("--from-replica", LOST, "--mode", "merge", "--config", str(other))
    assert run.code == 1, run.err
    assert center.created_keys() == {free.dedupe_key}
    assert f"edge-recover --from-replica {LOST} --config {other} --path " in run.out
    held = await states(nats_cluster)
    assert held == {free.serial: DELIVERED, pinned.serial: PENDING}


async def _try_read_changes(cluster: NatsCluster) -> dict[str, Any] | None:
    try:
        return await read_replica(cluster.urls, LOST)
    except Exception:
        return None


async def test_returning_server_after_a_takeover_sends_nothing_again(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    config, serials, sent = await taken_over(tmp_path, center, nats_cluster, agent_process, 30)
    spool = tmp_path / "lost" / "spool"
    assert len(order_files(spool / "pending")) == 30
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        await wait_for(lambda: not order_files(spool / "pending"), 15, "pending/ emptied")
        assert len(order_files(spool / "merged")) == 30
        assert center.sends() == sent  # moved to merged/ without being sent
        key = next(iter(serials))
        status, body = await post(session, agent.url, orders_for("lost", 30)[key])
        assert (status, body["serial"]) == (200, serials[key])
        agent.kill(signal.SIGTERM)
        assert await reap(agent) == 0


async def test_returning_server_with_the_replica_unreachable_holds_its_drain(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    """The server comes back after a takeover while NATS is down: it cannot learn what
    was delivered meanwhile, so it sends none of pending/ (the center's idempotency
    is not what keeps the contract) until the replica answers, then moves them unsent."""
    config, serials, sent = await taken_over(tmp_path, center, nats_cluster, agent_process, 20)
    for node in nats_cluster.nodes:
        nats_cluster.kill(node)
    spool = tmp_path / "lost" / "spool"
    async with client() as session:
        agent = await start_agent(agent_process, config, session)

        async def held() -> dict[str, Any] | None:
            async with session.get(f"{agent.url}/status") as r:
                doc: dict[str, Any] = orjson.loads(await r.read())
            rep = doc["replication"]
            return doc if doc["mode"] == "normal" and rep["reconciled"] is False else None

        doc = await wait_for(held, 15, "normal mode with pending/ held")
        assert doc["pending"] == 20
        # A negative check needs a window: the drain rescans every second
        # (scan_interval_s = 1), so an ungated drain sends within it (it did: 20 resent).
        await asyncio.sleep(3.0)
        assert center.sends() == sent
        assert len(order_files(spool / "pending")) == 20
        new = orders_for("new", 1)
        key = next(iter(new))
        status, _ = await post(session, agent.url, new[key])
        assert status == 201  # new orders still go straight to the center
        nats_cluster.start()
        await wait_for(lambda: not order_files(spool / "pending"), 60, "pending/ reconciled")
        assert len(order_files(spool / "merged")) == 20
        assert {k: v for k, v in center.sends().items() if k in serials} == sent
        agent.kill(signal.SIGTERM)
        assert await reap(agent) == 0


async def test_kill9_between_local_write_and_replica_ack_loses_nothing_creates_nothing_twice(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    """The replica is frozen (SIGSTOP) so the orders are durable locally but not yet
    acknowledged, then the agent is killed -9: no client got a 2xx. After a restart every
    retry is answered as the same order and the center creates each exactly once."""
    await center.go_down()
    config = agent_config(tmp_path / "a", center, nats_cluster, LOST, timeout_s=30)
    bodies = orders_for("frozen", 12)
    spool = tmp_path / "a" / "spool"
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        assert (await post(session, agent.url, orjson.dumps(order("warm"))))[0] == 202
        for node in nats_cluster.nodes:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
        try:
            sending = asyncio.ensure_future(send_all(session, agent.url, bodies, bodies))
            await wait_for(lambda: len(order_files(spool / "pending")) == 13, 15, "12 local writes")
            agent.kill(signal.SIGKILL)
            assert await reap(agent) == -signal.SIGKILL
            answers = await sending
        finally:
            for node in nats_cluster.nodes:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGCONT)
        assert all(status is None for status, _ in answers.values()), answers
    await center.come_up()
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        again = await send_all(session, agent.url, bodies, bodies)
        assert {s for s, _ in again.values()} <= {200, 201, 202}, again
        await wait_for(lambda: center.created_keys() >= set(bodies), 20, "every create")
        assert center.duplicates() == {}
        held = await wait_for(
            lambda: _delivered_all(nats_cluster, {b["serial"] for _, b in again.values()}),
            30,
            "every order marked delivered in the replica",
            interval=0.3,
        )
        assert held
        agent.kill(signal.SIGTERM)
        assert await reap(agent) == 0


async def _delivered_all(cluster: NatsCluster, serials: set[str]) -> bool:
    held = await _try_read(cluster, LOST)
    return held is not None and all(held.get(s) == DELIVERED for s in serials)


async def test_kill9_under_load_with_replication_loses_no_acknowledged_order(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster, agent_process: Any
) -> None:
    """Either order of events: killed after the local write, or after the replica's ack but
    before the 202. Every 2xx'd order and every retried one is created exactly once."""
    await center.go_down()
    config = agent_config(tmp_path / "a", center, nats_cluster, LOST)
    bodies = orders_for("load", 300)
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        sending = asyncio.ensure_future(send_all(session, agent.url, bodies, bodies))
        spool = tmp_path / "a" / "spool"
        target = random.randint(40, 200)
        await wait_for(
            lambda: len(order_files(spool / "pending")) >= target, 30, f"{target} orders"
        )
        agent.kill(signal.SIGKILL)
        assert await reap(agent) == -signal.SIGKILL
        first = await sending
    acked = {k for k, (s, _) in first.items() if s in (200, 201, 202)}
    assert acked, "the kill came before any answer: nothing to check"
    await center.come_up()
    async with client() as session:
        agent = await start_agent(agent_process, config, session)
        again = await send_all(session, agent.url, bodies, bodies)
        assert {s for s, _ in again.values()} <= {200, 201, 202}, again
        for key in acked:
            assert again[key][1]["serial"] == first[key][1]["serial"], key
        await wait_for(lambda: center.created_keys() == set(bodies), 30, "every create")
        assert center.duplicates() == {}
        agent.kill(signal.SIGTERM)
        assert await reap(agent) == 0
