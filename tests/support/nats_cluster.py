"""The ``nats_cluster`` fixture: a real three-node nats-server cluster on loopback
(agent/sandbox/nats_cluster.py), installed with apt-get when missing, skipped with a
clear reason when that is impossible (failed under CI)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.sandbox.nats_cluster import NatsCluster, available
from tests.support import host_tools


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
