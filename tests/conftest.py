"""Fixtures for every test directory; the helpers they use live in tests/support/."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.config import load_config
from agent.drill.sandbox import Sandbox
from tests.support.fakes import FakeAliyun, FakeCenter, FakeSmsGateway
from tests.support.harness import AgentFactory, AgentHandle, AgentProcess, write_config

# Fixtures that live beside their harness: nats_cluster (tests/support/nats_cluster.py).
pytest_plugins = ["tests.support.nats_cluster"]


@pytest.fixture
async def center() -> AsyncIterator[FakeCenter]:
    c = await FakeCenter(host="127.0.0.2").start()
    yield c
    await c.stop()


@pytest.fixture
async def standby() -> AsyncIterator[FakeCenter]:
    c = await FakeCenter(host="127.0.0.3", name="standby").start()
    yield c
    await c.stop()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """The drill's whole sandbox (primary, standby, spare, DNS, SMS gateway) on loopback."""
    sb = await Sandbox().start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    try:
        yield session
    finally:
        # Bounded: a connection to an agent the test killed must not hold up teardown.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.close(), 10)


@pytest.fixture
async def make_agent(tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[AgentFactory]:
    started: list[AgentHandle] = []

    async def factory(primary: str, **sections: dict[str, Any]) -> AgentHandle:
        path = write_config(tmp_path, primary, **sections)
        handle = AgentHandle(load_config(str(path)), http)
        await handle.service.start()
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        await handle.service.stop()


@pytest.fixture
def agent_process(tmp_path: Path) -> Any:
    procs: list[AgentProcess] = []

    def factory(
        config: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> AgentProcess:
        p = AgentProcess(config, tmp_path / "agent.log", env, prefix)
        procs.append(p)
        return p

    yield factory
    for p in procs:
        p.cleanup()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is root's 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a process as another user")
    base = Path(tempfile.mkdtemp(prefix="edge-shared-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def sms_gateway() -> AsyncIterator[FakeSmsGateway]:
    g = await FakeSmsGateway(host="127.0.0.4").start()
    yield g
    await g.stop()


@pytest.fixture
async def aliyun() -> AsyncIterator[FakeAliyun]:
    a = await FakeAliyun(host="127.0.0.4").start()
    yield a
    await a.stop()


def _dump_tasks(signum: int, frame: Any) -> None:
    """kill -USR1 <pytest pid>: print every asyncio task's stack (to find a hang)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    tasks = asyncio.all_tasks(loop) if loop is not None else set()
    print(f"\n--- {len(tasks)} asyncio tasks ---", file=sys.stderr)
    for task in tasks:
        task.print_stack(file=sys.stderr)


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGUSR1, _dump_tasks)
