"""One owner per buffer (DESIGN 10): a second agent on one buffer or state dir refuses to start.

Two agents with one node_id on one buffer.path issue the same serials; the
second one's rename replaced the first one's acknowledged pending file (3 of
6 orders answered 202 were gone). Here both are real subprocesses on real
directories: the second must exit 2 with one line naming the path and the
holder, and the first must keep every order it acknowledged.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from agent.config import load_config
from agent.errors import DirectoryHeld, StartupError
from agent.service.service import Service
from agent.state.owner import LOCK_NAME, DirOwner, own_all
from tests.support.fakes import FakeCenter, free_port
from tests.support.harness import AgentProcess, order, write_config

pytestmark = pytest.mark.slow


def second_config(tmp: Path, first: Path, buffer: Path | None = None, **agent: Any) -> Path:
    """A copy of ``first`` in ``tmp`` with another listen port and ``agent`` keys."""
    tmp.mkdir(exist_ok=True)
    cfg = load_config(str(first))
    return write_config(
        tmp,
        cfg.upstream.primary,
        agent={
            "node_id": cfg.agent.node_id,
            "state_dir": cfg.agent.state_dir,
            "listen": f"127.0.0.1:{free_port()}",
            **agent,
        },
        buffer={"path": str(buffer or cfg.buffer.path)},
    )


@pytest.fixture
async def first(
    tmp_path: Path,
    center: FakeCenter,
    http: aiohttp.ClientSession,
) -> AsyncIterator[AgentProcess]:
    """A running agent (a subprocess) whose orders are all buffered: 202 and a file."""
    await center.go_down()
    agent = AgentProcess(write_config(tmp_path, center.url), tmp_path / "first.log")
    try:
        agent.start()
        await agent.wait_ready(http)
        yield agent
    finally:
        agent.cleanup()


async def post_orders(
    session: aiohttp.ClientSession,
    url: str,
    prefix: str,
    n: int,
) -> dict[str, tuple[int, dict[str, Any]]]:
    out = {}
    for i in range(n):
        body = orjson.dumps(order(f"{prefix}-{i}"))
        async with session.post(
            f"{url}/v1/orders", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            out[f"douyin:{prefix}-{i}"] = (r.status, orjson.loads(await r.read()))
    return out


def assert_kept(spool: Path, acked: dict[str, tuple[int, dict[str, Any]]]) -> None:
    """Every 202'd order is in pending/ under its serial, with its own dedupe key."""
    for key, (status, body) in acked.items():
        assert status == 202, (key, status, body)
        path = spool / "pending" / f"{body['serial']}.json"
        doc = orjson.loads(path.read_bytes())
        assert doc["dedupe_key"] == key, f"{path.name} holds {doc['dedupe_key']}, not {key}"


async def refused_second(first: AgentProcess, config: Path, log: Path) -> str:
    """Start a second agent on ``config``; it must exit 2 with one stderr line: that line."""
    second = AgentProcess(config, log)
    second.start()
    try:
        code = await second.reap(timeout=20)
    finally:
        second.cleanup()
    lines = log.read_text().splitlines()
    assert code == 2, f"the second agent exited {code}: {lines[-5:]}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {lines}"
    assert first.proc is not None
    assert f"pid {first.proc.pid} " in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("own_state_dir", [False, True], ids=["same-state", "own-state"])
async def test_second_agent_on_one_buffer_exits_2_and_the_first_keeps_every_order(
    tmp_path: Path, first: AgentProcess, http: aiohttp.ClientSession, own_state_dir: bool
):
    spool = tmp_path / "spool"
    acked = await post_orders(http, first.url, "before", 3)
    extra = {"state_dir": str(tmp_path / "state2")} if own_state_dir else {}
    line = await refused_second(
        first, second_config(tmp_path / "two", first.config, **extra), tmp_path / "second.log"
    )
    assert re.fullmatch(
        rf"edge-agent: buffer {re.escape(str(spool))} is held by pid \d+ \(node wh-test-01 "
        rf"on host {re.escape(socket.gethostname())} since \S+\); stop that agent or give "
        r"this one its own buffer\.path",
        line,
    ), line
    acked |= await post_orders(http, first.url, "after", 3)
    assert_kept(spool, acked)
    assert not (tmp_path / "state2").exists() or not os.listdir(tmp_path / "state2"), (
        "the refused agent wrote into its state dir"
    )


async def test_second_agent_on_one_state_dir_exits_2(
    tmp_path: Path, first: AgentProcess, http: aiohttp.ClientSession
):
    acked = await post_orders(http, first.url, "before", 3)
    other_spool = tmp_path / "spool2"
    line = await refused_second(
        first,
        second_config(tmp_path / "two", first.config, buffer=other_spool),
        tmp_path / "second.log",
    )
    assert line.startswith(f"edge-agent: state dir {tmp_path / 'state'} is held by pid ")
    assert line.endswith("; stop that agent or give this one its own agent.state_dir")
    assert not (other_spool / "pending").exists(), "the refused agent wrote a buffer"
    assert_kept(tmp_path / "spool", acked)


async def test_a_kill9_agent_leaves_no_stale_lock(
    tmp_path: Path, center: FakeCenter, http: aiohttp.ClientSession
):
    await center.go_down()
    config = write_config(tmp_path, center.url)
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        agent.start()
        await agent.wait_ready(http)
        acked = await post_orders(http, agent.url, "one", 2)
        agent.kill(signal.SIGKILL)
        assert await agent.reap() == -signal.SIGKILL
        assert (tmp_path / "spool" / LOCK_NAME).exists()  # the text stays, the lock does not
        agent.start()
        await agent.wait_ready(http)
        acked |= await post_orders(http, agent.url, "two", 2)
        assert_kept(tmp_path / "spool", acked)
        holder = orjson.loads((tmp_path / "spool" / LOCK_NAME).read_bytes())
        assert holder["pid"] == agent.proc.pid  # type: ignore[union-attr]
    finally:
        agent.cleanup()


# -- the lock object itself ------------------------------------------------------------


async def test_owner_lock_refuses_a_second_owner_and_is_free_after_stop(tmp_path: Path):
    one = DirOwner(tmp_path / "buf", "buffer", "buffer.path", "n1")
    two = DirOwner(tmp_path / "buf", "buffer", "buffer.path", "n1")
    await one.start()
    with pytest.raises(
        DirectoryHeld,
        match=rf"buffer {tmp_path / 'buf'} is held by pid "
        rf"{os.getpid()} \(node n1 on host ",
    ):
        await two.start()
    assert not two.held
    await one.stop()
    await two.start()  # free again
    await two.stop()


async def test_state_dir_equal_to_buffer_path_is_owned_once(tmp_path: Path):
    same = tmp_path / "both"
    owners = [
        DirOwner(same, "buffer", "buffer.path", "n1"),
        DirOwner(Path(str(same) + "/"), "state dir", "agent.state_dir", "n1"),
    ]
    held = await own_all(owners)
    assert held == owners[:1]
    with pytest.raises(DirectoryHeld):
        await own_all([DirOwner(same, "buffer", "buffer.path", "n2")])
    for owner in held:
        await owner.stop()


async def test_in_process_agent_refused_touches_nothing(tmp_path: Path, center: FakeCenter):
    """A refused Service.start() leaves the first agent's files (running marker) alone."""
    config = write_config(tmp_path, center.url)
    first = Service(load_config(str(config)))
    await first.start()
    try:
        marker = tmp_path / "state" / "agent.running"
        assert marker.exists()
        second = Service(load_config(str(config)))
        with pytest.raises(DirectoryHeld):
            await second.start()
        await second.stop()  # what a caller's cleanup does: must not remove the marker
        assert marker.exists()
    finally:
        await first.stop()
    assert not marker.exists()  # the owner's own clean stop removes it


async def test_an_unusable_directory_is_a_clear_error(tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    owner = DirOwner(tmp_path / "a-file" / "spool", "buffer", "buffer.path", "n1")
    with pytest.raises(
        StartupError,
        match=r"cannot lock the buffer .*a-file/spool: Not a "
        r"directory; check buffer\.path",
    ):
        await own_all([owner])
    assert not owner.held
