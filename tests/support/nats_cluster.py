"""The ``nats_cluster`` fixture: a real three-node nats-server cluster on loopback
(agent/sandbox/nats_cluster.py), installed with apt-get when missing, skipped with a
clear reason when that is impossible (failed under CI)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from agent.replica.stream import STREAM
from agent.sandbox.nats_cluster import NatsCluster, available, quiet_errors
from tests.support import host_tools
from tests.support.harness import wait_for


def ensure_nats_server() -> None:
    if available():
        return
    try:
        host_tools.ensure({"nats-server": "nats-server"})
    except (OSError, subprocess.SubprocessError) as exc:
        if host_tools.required():
            raise
        pytest.skip(f"nats-server is not installed and apt-get could not install it: {exc}")


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    ensure_nats_server()
    cluster = NatsCluster(tmp_path / "nats")
    cluster.start()
    try:
        await cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


async def stream_leader(cluster: NatsCluster) -> str:
    """The name of the node that leads the replica's stream now (waits for one)."""

    async def leader() -> str | None:
        nc = await nats.connect(servers=cluster.urls, error_cb=quiet_errors)
        try:
            info = await nc.jetstream(timeout=2).stream_info(STREAM)
        except Exception:
            return None
        finally:
            await nc.close()
        return info.cluster.leader if info.cluster else None

    name: str = await wait_for(leader, 30, f"a leader of {STREAM}", interval=0.3)
    return name
