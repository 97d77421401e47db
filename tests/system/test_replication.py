"""The buffer replicated through a real three-node NATS JetStream cluster (CONTRACT 11).

In-process agents (real HTTP, real files) against a loopback fake center; the
nats-server nodes are real processes killed with real signals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import pytest

from agent.errors import ReplicaError
from agent.replica.stream import DELIVERED, PENDING, STREAM, WITHDRAWN, Change
from agent.sandbox.nats_cluster import NatsCluster, quiet_errors, read_replica
from tests.support.fakes import FakeCenter, free_port
from tests.support.harness import AgentFactory, AgentHandle, order, wait_for, write_config
from tests.support.nats_cluster import stream_leader
from tests.support.recover_helpers import recover

pytestmark = pytest.mark.replication
NODE = "wh-test-01"


def replication(cluster: NatsCluster, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "servers": cluster.urls, "replicas": 3, "timeout_s": 1, **extra}


async def replica_states(cluster: NatsCluster, node: str = NODE) -> dict[str, Change]:
    """What the replica holds for ``node``; retried while JetStream elects new leaders."""

    async def listing() -> dict[str, Change] | None:
        try:
            return await read_replica(cluster.urls, node)
        except ReplicaError:
            return None

    found: dict[str, Change] = await wait_for(listing, 30, "the replica listing", interval=0.3)
    return found


async def post_until_accepted(agent: AgentHandle, n: int, timeout: float = 20) -> None:
    """After a node loss JetStream elects new leaders: the first orders may get 503."""

    async def accepted() -> bool:
        status, _ = await agent.post(order(n))
        return status == 202

    await wait_for(accepted, timeout, "an order accepted after the node loss", interval=0.2)


async def test_202_only_once_the_record_is_on_the_replica(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    await center.go_down()
    agent = await make_agent(center.url, replication=replication(nats_cluster))
    serials = []
    for n in range(10):
        status, body = await agent.post(order(n))
        assert status == 202, body
        serials.append(body["serial"])
    held = await replica_states(nats_cluster)
    assert {s: held[s].state for s in serials} == dict.fromkeys(serials, PENDING)
    assert held[serials[0]].record.dedupe_key == "douyin:0"
    nc = await nats.connect(servers=nats_cluster.urls, error_cb=quiet_errors)
    try:
        info = await nc.jetstream().stream_info(STREAM)
        assert info.config.num_replicas == 3
        assert info.config.max_msgs_per_subject == 1
    finally:
        await nc.close()
    _, found = await agent.get(f"/v1/orders/{serials[0]}")
    assert found["replicated"] is True
    _, status_doc = await agent.get("/status")
    assert status_doc["replication"]["healthy"] is True


async def test_one_nats_node_down_still_takes_orders(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    await center.go_down()
    agent = await make_agent(center.url, replication=replication(nats_cluster))
    assert (await agent.post(order("before")))[0] == 202
    nats_cluster.kill(nats_cluster.nodes[0])
    await post_until_accepted(agent, 10_000)
    for n in range(20):
        status, body = await agent.post(order(n))
        assert status == 202, body
    held = await replica_states(nats_cluster)
    assert len(held) >= 22


async def test_no_quorum_with_required_gives_503_and_the_order_never_reaches_the_center(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    await center.go_down()
    agent = await make_agent(center.url, replication=replication(nats_cluster, required=True))
    status, kept = await agent.post(order("kept"))
    assert status == 202
    for node in nats_cluster.nodes[:2]:
        nats_cluster.kill(node)
    status, body = await agent.post(order("refused"))
    assert status == 503, body
    assert "replica" in body["error"] and "quorum" in body["error"]
    assert agent.files("pending") == [f"{kept['serial']}.json"]
    _, found = await agent.get("/v1/orders/by-key/douyin:refused")
    assert found.get("state") != "buffered"
    await center.come_up()
    await wait_for(lambda: "douyin:kept" in center.created_keys(), 15, "the kept order drained")
    await wait_for(lambda: agent.files("pending") == [], 10, "pending/ emptied")
    assert "douyin:refused" not in center.sends()


async def test_a_refused_order_the_leader_kept_is_withdrawn_in_the_replica(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """The stream's two followers die: the leader takes the publish but cannot commit it,
    and the agent answers 503. When the followers return the leader may commit it after
    all; without a tombstone a takeover then created an order the client was told was
    not accepted (seen in every run of the power-loss suite's followers-down scenario)."""
    await center.go_down()
    agent = await make_agent(center.url, replication=replication(nats_cluster, required=True))
    status, _ = await agent.post(order("kept"))
    assert status == 202
    leader = await stream_leader(nats_cluster)
    followers = [n for n in nats_cluster.nodes if n.name != leader]
    for node in followers:
        nats_cluster.kill(node)
    refused = []
    for n in range(5):
        status, body = await agent.post(order(f"refused-{n}"))
        assert status == 503, body
        refused.append(f"douyin:refused-{n}")
    for node in followers:
        nats_cluster.start_node(node)

    async def tombstones_written() -> bool:
        _, doc = await agent.get("/status")
        return bool(doc["replication"]["owed_changes"] == 0)

    await wait_for(tombstones_written, 60, "the withdrawals written", interval=0.5)
    held = await replica_states(nats_cluster)
    by_key = {c.record.dedupe_key: c.state for c in held.values()}
    assert by_key["douyin:kept"] == PENDING
    assert {by_key.get(k) for k in refused} == {WITHDRAWN}
    # The server is lost now; another machine takes its orders over.
    await center.come_up()
    (tmp_path / "c").mkdir()
    other = write_config(
        tmp_path / "c",
        center.url,
        replication=replication(nats_cluster),
        agent={"node_id": "wh-other"},
    )
    run = await recover("--from-replica", NODE, "--mode", "merge", "--config", str(other))
    assert run.code == 0, run.err
    assert center.created_keys() == {"douyin:kept"}


async def test_not_required_flags_local_only_orders_then_replicates_them(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    await center.go_down()
    agent = await make_agent(center.url, replication=replication(nats_cluster, required=False))
    assert (await agent.post(order("warm")))[0] == 202
    down = nats_cluster.nodes[:2]
    for node in down:
        nats_cluster.kill(node)
    status, body = await agent.post(order("local"))
    assert status == 202, body
    serial = body["serial"]
    _, found = await agent.get(f"/v1/orders/{serial}")
    assert found["replicated"] is False
    _, doc = await agent.get("/status")
    assert doc["replication"]["unreplicated"] == 1
    _, metrics = await agent.get("/metrics")
    assert "edge_buffer_unreplicated 1.0" in metrics
    for node in down:
        nats_cluster.start_node(node)

    async def replicated() -> bool:
        _, found = await agent.get(f"/v1/orders/{serial}")
        return bool(found["replicated"])

    await wait_for(replicated, 60, "the local-only order replicated", interval=0.2)
    held = await replica_states(nats_cluster)
    assert held[serial].state == PENDING
    _, doc = await agent.get("/status")
    assert doc["replication"]["unreplicated"] == 0


async def test_delivered_is_written_to_the_replica_with_its_order_id(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    await center.go_down()
    agent = await make_agent(center.url, replication=replication(nats_cluster))
    serials = [(await agent.post(order(n)))[1]["serial"] for n in range(5)]
    await center.come_up()
    await wait_for(lambda: agent.files("pending") == [], 15, "the buffer drained")
    held = await replica_states(nats_cluster)
    assert {held[s].state for s in serials} == {DELIVERED}
    assert all(held[s].order_id is not None for s in serials)
    assert {held[s].cluster for s in serials} == {"primary"}


async def test_a_stream_with_fewer_replicas_refuses_start_with_one_line(
    tmp_path: Path, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    import asyncio
    import sys

    from agent.replica.stream import SUBJECT_ROOT
    from tests.support.harness import ROOT, write_config

    nc = await nats.connect(servers=nats_cluster.urls, error_cb=quiet_errors)
    try:
        await nc.jetstream().add_stream(name=STREAM, subjects=[f"{SUBJECT_ROOT}.>"], num_replicas=1)
    finally:
        await nc.close()
    config = write_config(tmp_path, center.url, replication=replication(nats_cluster))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(config),
        cwd=ROOT, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    lines = [line for line in err.decode().splitlines() if STREAM in line]
    assert lines and "has 1 replicas" in lines[-1] and "replication.replicas is 3" in lines[-1]


async def test_agent_starts_with_the_replica_down_and_refuses_until_it_is_back(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster
) -> None:
    await center.go_down()
    for node in nats_cluster.nodes:
        nats_cluster.kill(node)
    agent = await make_agent(center.url, replication=replication(nats_cluster))
    status, body = await agent.post(order("early"))
    assert status == 503, body
    assert agent.files("pending") == []
    _, doc = await agent.get("/status")
    assert doc["replication"]["healthy"] is False and doc["replication"]["last_error"]
    nats_cluster.start()
    await post_until_accepted(agent, 1, timeout=60)
    _, doc = await agent.get("/status")
    assert doc["replication"]["healthy"] is True


def server(tmp_path: Path, name: str) -> dict[str, dict[str, Any]]:
    """One warehouse server's own directories and port (the node_id stays the default)."""
    return {
        "agent": {
            "state_dir": str(tmp_path / name / "state"),
            "listen": f"127.0.0.1:{free_port()}",
        },
        "buffer": {"path": str(tmp_path / name / "spool")},
    }


async def test_two_servers_sharing_a_node_id_never_overwrite_each_others_orders(
    make_agent: AgentFactory, center: FakeCenter, nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """One agent.toml copied to every server: one node_id, so the same serials. Without a
    guard the second server's records replaced the first's in the replica, and a takeover
    of that node would have missed the first server's 202'd orders."""
    await center.go_down()
    rep = replication(nats_cluster)
    first = await make_agent(center.url, replication=rep, **server(tmp_path, "a"))
    second = await make_agent(center.url, replication=rep, **server(tmp_path, "b"))
    accepted: dict[str, str] = {}  # serial -> dedupe key, every order answered 202
    for n in range(5):
        status, body = await first.post(order(f"a{n}"))
        assert status == 202, body
        accepted[body["serial"]] = f"douyin:a{n}"
    refused, kept = [], []
    for n in range(8):
        status, body = await second.post(order(f"b{n}"))
        if status == 202:
            assert body["serial"] not in accepted
            accepted[body["serial"]] = f"douyin:b{n}"
            kept.append(f"{body['serial']}.json")
        else:
            assert status == 503 and "agent.node_id" in body["error"], (status, body)
            refused.append(n)
    assert refused == [0, 1, 2, 3, 4]  # the serials the first server holds
    assert second.files("pending") == kept  # a refused order leaves no file to deliver
    held = await replica_states(nats_cluster)
    assert {s: held[s].record.dedupe_key for s in accepted} == accepted
    _, doc = await second.get("/status")
    assert doc["replication"]["conflicts"] == 5 and doc["replication"]["healthy"] is True
    # The node taken over from a third machine: every 202'd order of both, once each.
    await center.come_up()
    (tmp_path / "c").mkdir()
    other = write_config(tmp_path / "c", center.url, replication=rep, agent={"node_id": "wh-other"})
    run = await recover("--from-replica", NODE, "--mode", "merge", "--config", str(other))
    assert run.code == 0, run.err
    assert center.created_keys() == set(accepted.values())
    assert center.duplicates() == {}


async def test_listing_in_many_requests_returns_each_order_once_with_its_latest_state(
    nats_cluster: NatsCluster,
) -> None:
    """The listing asks for a batch at a time, the next one before the last is parsed:
    23 orders read 5 at a time come back whole, none twice, each in its latest state,
    and another node's orders are not among them."""
    from agent.replica.stream import Publisher, ensure_stream, states
    from tests.support.recover_helpers import record

    nc = await nats.connect(servers=nats_cluster.urls, error_cb=quiet_errors)
    try:
        await ensure_stream(nc.jetstream(timeout=5), 3, 5)
        publisher = Publisher(nc)
        mine = [record(n, n, node="wh-list") for n in range(23)]
        other = [record(n, n, node="wh-else") for n in range(4)]
        changes = [Change(PENDING, r) for r in mine + other]
        stored = await publisher.publish_all(changes, 5)
        assert all(isinstance(seq, int) for seq in stored), stored
        later = [Change(DELIVERED, r, f"o-{i}") for i, r in enumerate(mine[::3])]
        stored = await publisher.publish_all(later, 5)
        assert all(isinstance(seq, int) for seq in stored), stored
        batches = [b async for b in states(nc, "wh-list", 2, batch=5)]
    finally:
        await nc.close()
    assert len(batches) == 5
    listed = [c for b in batches for c in b]
    assert sorted(c.record.serial for c in listed) == sorted(r.serial for r in mine)
    delivered = {r.serial for r in mine[::3]}
    assert {c.record.serial: c.state for c in listed} == {
        r.serial: DELIVERED if r.serial in delivered else PENDING for r in mine
    }
